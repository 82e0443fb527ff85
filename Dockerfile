# syntax=docker/dockerfile:1
# One image for every metaproxy process:
#   docker run IMAGE                 # the sidecar on unprivileged ports (default; see below)
#   docker run IMAGE broker          # the credential broker
#   docker run IMAGE webhook --image IMAGE --broker-url https://...   # the injection webhook
# The sidecar never imports boto3, so carrying the broker's extra costs it disk, not memory.
#
# BASE is any image with Python 3.11 (`python` and its `venv` module) on Debian: the official
# python:3.11-slim by default; where no registry is reachable, `make image` builds the same from
# Debian's packages (tests/cluster/images.py).
ARG BASE=python:3.11-slim

# ---- builder: compilers and pip live here only --------------------------------------------
FROM ${BASE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY metaproxy ./metaproxy

# Wheels for metaproxy and every dependency, then an offline install from exactly those wheels
# into a self-contained venv that the final stage copies whole. The venv's own pip makes the
# wheels: Debian's python3.11 has no `pip` command of its own, only the venv module's.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip wheel --wheel-dir /wheels ".[broker]" \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "metaproxy[broker]" \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel
# pip has compiled every module to .pyc: keep them, the sidecar's start-up time depends on it.

# ---- final: the interpreter and the venv, nothing else ------------------------------------
FROM ${BASE}

# The .pyc files were compiled in the builder; at run time the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# iptables: `metaproxy link-local setup` (the webhook's init-container mode) redirects the pod's
# link-local metadata addresses to its sidecar with it. Nothing else in the image uses it.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 metaproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin metaproxy

COPY --from=builder /opt/venv /opt/venv

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Sidecar admin (9901), broker API and admin (8443, 9902); documentation only.
EXPOSE 9901 8443 9902

ENTRYPOINT ["metaproxy"]
# The default command serves IMDS on 127.0.0.1:8182 and container credentials on
# 127.0.0.1:8181, and /healthz, /readyz and /metrics on 9901, where /readyz says what it still
# needs (an identity token, a broker). The sidecar never binds port 80: in a pod, metaproxy's CNI
# plugin or init container redirects 169.254.169.254, 169.254.170.2 and 169.254.170.23 to these
# ports (docs/link-local.md), and the application keeps port 80 for itself.
# Flags beat METAPROXY_* variables: to set these three listen addresses through the
# environment, give the command yourself (`sidecar`).
CMD ["sidecar", "--imds-listen", "127.0.0.1:8182", "--container-listen", "127.0.0.1:8181", \
     "--admin-listen", "0.0.0.0:9901"]
