# syntax=docker/dockerfile:1
# One image for every metaproxy process:
#   docker run IMAGE                 # the sidecar on unprivileged ports (default; see below)
#   docker run IMAGE broker          # the credential broker
#   docker run IMAGE webhook --image IMAGE --broker-url https://...   # the injection webhook
# The sidecar never imports boto3, so carrying the broker's extra costs it disk, not memory.

# ---- builder: compilers and pip live here only --------------------------------------------
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY metaproxy ./metaproxy

# Wheels for metaproxy and every dependency, then an offline install from exactly those wheels
# into a self-contained venv that the final stage copies whole.
RUN pip wheel --wheel-dir /wheels ".[broker]" \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels "metaproxy[broker]" \
 && /opt/venv/bin/pip uninstall --yes pip setuptools wheel
# pip has compiled every module to .pyc: keep them, the sidecar's start-up time depends on it.

# ---- final: the interpreter and the venv, nothing else ------------------------------------
FROM python:3.11-slim

# The .pyc files were compiled in the builder; at run time the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid 10001 metaproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin metaproxy

COPY --from=builder /opt/venv /opt/venv

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Sidecar admin (9901), broker API and admin (8443, 9902); documentation only.
EXPOSE 9901 8443 9902

ENTRYPOINT ["metaproxy"]
# A non-root user cannot bind port 80, so the default command serves IMDS on 127.0.0.1:8182 and
# container credentials on 127.0.0.1:8181 (point SDKs there with
# AWS_EC2_METADATA_SERVICE_ENDPOINT / AWS_CONTAINER_CREDENTIALS_FULL_URI), and /healthz, /readyz
# and /metrics on 9901, where /readyz says what it still needs (an identity token, a broker).
# To serve the SDKs' default addresses on port 80 as this user, let unprivileged processes bind
# low ports in the container's network namespace, then pass the sidecar's flags yourself:
#   docker run --sysctl net.ipv4.ip_unprivileged_port_start=80 IMAGE sidecar ...
#   (Kubernetes: securityContext.sysctls, a "safe" sysctl; or grant CAP_NET_BIND_SERVICE)
# Flags beat METAPROXY_* variables: to set these three listen addresses through the
# environment, give the command yourself (`sidecar`).
CMD ["sidecar", "--imds-listen", "127.0.0.1:8182", "--container-listen", "127.0.0.1:8181", \
     "--admin-listen", "0.0.0.0:9901"]
