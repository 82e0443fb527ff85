# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS_STAMP := tests/js/node_modules/.installed

.PHONY: demo test load-test check lint typecheck bench clean system-deps prometheus-operator

# constraints.txt pins what the type gate and the suite were last green with (its header says
# how to move on).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

demo: $(STAMP)
	$(BIN)/metaproxy demo

# System tools the tests use: iproute2 (network namespaces), promtool from prometheus (alert
# rule tests), redis-server (the fleet's shared store; valkey-server serves as well), Debian's
# CNI plugins and iptables (link-local pods), curl (the IMDS documentation's client), pypy3 (an
# interpreter older than 3.11, for the CNI plugin's own error) and node with npm (the JS SDK).
# Installed when we are root on Debian (CI is); otherwise those tests skip and say why, and in
# CI (CI=true) they fail instead: nothing may skip there.
# Each tool as command:Debian package; only the missing ones are installed.
SYSTEM_TOOLS := ip:iproute2 promtool:prometheus iptables-restore:iptables curl:curl pypy3:pypy3 \
	node:nodejs npm:npm
system-deps:
	@missing=$$(for tool in $(SYSTEM_TOOLS); do \
		command -v $${tool%%:*} >/dev/null || [ -x /usr/sbin/$${tool%%:*} ] || echo $${tool#*:}; \
	done; \
	command -v valkey-server >/dev/null || command -v redis-server >/dev/null || echo redis-server; \
	[ -x /usr/lib/cni/bridge ] || echo containernetworking-plugins); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "apt-get install" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		  --no-install-recommends $$missing >/dev/null; \
	fi

# Two passes. First most tests side by side on $(TEST_WORKERS) workers: they mostly wait on
# servers and child processes, so more workers than the 2 cores CI has pay off; each worker
# takes two tests at a time, the `slow` ones first (tests/conftest.py), so the longest do not
# end the run. Then the ones marked `serial`, which assert latencies or rates that the first
# pass's load would skew, three at a time (they mostly wait on timers). The second pass runs
# even when the first fails, so one run reports every failure. On a fresh clone, with no
# bytecode yet, the package is compiled and one collection writes pytest's rewritten test
# modules first, rather than every worker doing both at once (about 15 s of the first pass).
# `make load-test` runs the `load` tests (floods, rates at the STS budget through three
# replicas), alone and one after another; the client matrix (`clients`) is `make e2e`'s, the
# image and its pods (`image`) `make image-test`'s. .ci/run runs all four.
TEST_WORKERS ?= 8
# Each worker imports every test module; with bytecode writing off (PYTHONDONTWRITEBYTECODE, as
# in our agents' shells) every worker rewrites and compiles all of them on every run: 23 s of
# CPU for four workers to collect, against 14 s with the bytecode kept (measured).
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/pytest -p no:cacheprovider

NOT_ELSEWHERE := not load and not clients and not image

test: $(STAMP) system-deps $(JS_STAMP)
	status=0; \
	test -d tests/__pycache__ || { $(BIN)/python -m compileall -q -j 0 metaproxy bench \
	  && $(PYTEST) --collect-only -q >/dev/null; }; \
	$(PYTEST) -n $(TEST_WORKERS) --dist load --maxschedchunk 2 -m "$(NOT_ELSEWHERE) and not serial" \
	  || status=$$?; \
	$(PYTEST) -n 3 --dist load --maxschedchunk 1 -m "$(NOT_ELSEWHERE) and serial" \
	  || status=$$?; \
	exit $$status

# Each a whole machine's worth of load for seconds, judged by rates and latencies: alone.
load-test: $(STAMP) system-deps
	$(PYTEST) -m load

lint: $(STAMP)
	$(BIN)/ruff format --check metaproxy tests bench
	$(BIN)/ruff check metaproxy tests bench

# mypy --strict (pyproject) on the package and the tests, then on the client programs of
# `make e2e`, which import their sibling `report` as a top-level module.
typecheck: $(STAMP)
	$(BIN)/mypy
	MYPYPATH=tests/clients $(BIN)/mypy --explicit-package-bases tests/clients/*.py

check: lint typecheck test

# prometheus-operator's PrometheusRule and PodMonitors, generated from deploy/prometheus/alerts.yaml
# and scrape.yaml's jobs (tests/test_deploy_prometheus.py fails while they are out of date).
prometheus-operator: $(STAMP)
	$(BIN)/python deploy/prometheus/generate_operator.py

# Load generators and the reference server come from Debian (loopback only).
bench: $(STAMP)
	@command -v wrk >/dev/null && command -v h2load >/dev/null && command -v nginx >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		 --no-install-recommends wrk nghttp2-client nginx-light)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) tests/js/node_modules

# --- `make e2e`: every SDK generation and real client, in pods, against the webhook's env ------
# `make clients` installs them, once and only what is missing: Debian's own generations (apt, as
# root), Python venvs and npm under git-ignored directories, and two Go programs built from
# Debian's source packages in GOPATH mode (docs/compatibility.md lists them all).
CLIENTS := .clients
CLIENTS_JS := tests/clients/js
CLIENT_DEBS := awscli ruby ruby-aws-sdk-core golang-go golang-github-aws-aws-sdk-go-dev \
	golang-github-aws-aws-sdk-go-v2-dev s3cmd iptables containernetworking-plugins
GO_ENV := GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE=$(CURDIR)/$(CLIENTS)/gocache
CLIENT_STAMPS := $(CLIENTS)/debs.installed $(CLIENTS)/botocore-1.29/.installed \
	$(CLIENTS)/aiobotocore/.installed $(CLIENTS)/s3/.installed \
	$(CLIENTS_JS)/node_modules/.installed $(CLIENTS)/bin/aws-sdk-go $(CLIENTS)/bin/aws-sdk-go-v2

.PHONY: clients e2e

$(CLIENTS)/debs.installed:
	@missing=$$(for p in $(CLIENT_DEBS); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
			echo "make clients: install these Debian packages as root:" $$missing >&2; exit 1; \
		fi; \
		echo "apt-get install" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
	fi
	mkdir -p $(@D) && touch $@

# Debian bookworm's own botocore generation, and the boto3 release made for it.
$(CLIENTS)/botocore-1.29/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install --quiet --disable-pip-version-check botocore==1.29.27 boto3==1.26.27
	touch $@

$(CLIENTS)/aiobotocore/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install --quiet --disable-pip-version-check aiobotocore==3.10.0
	touch $@

# Clients that are not AWS SDKs: IMDS readers and S3 libraries with credential chains of their own.
$(CLIENTS)/s3/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install --quiet --disable-pip-version-check ec2-metadata==3.0.0 obstore==0.12.1 \
		pyarrow==26.0.1 minio==7.2.20 opentelemetry-sdk-extension-aws==2.1.0
	touch $@

$(CLIENTS_JS)/node_modules/.installed: $(CLIENTS_JS)/package.json $(CLIENTS_JS)/package-lock.json
	cd $(CLIENTS_JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CLIENTS)/bin/%: tests/clients/go/%/main.go $(CLIENTS)/debs.installed
	mkdir -p $(@D)
	$(GO_ENV) go build -o $@ ./$(<D)

clients: $(CLIENT_STAMPS)

# The slow end-to-end suite, run apart from `make test` (which skips it).
e2e: $(STAMP) system-deps $(JS_STAMP) clients
	$(PYTEST) -m clients

# --- `make image-test`: the image built with podman, the eks overlay run as pods (tests/cluster/)
# podman with runc and the CNI plugins, catatonit (the pods' infra containers), mmdebstrap (the
# base image when no registry answers), iptables and iproute2 (the node's network namespace and
# metaproxy-cni in it), from Debian, as root. kubectl renders the overlay the pods play
# (kustomize 5, kubectl 1.27 or later): the machine's own (1.32) does; Debian bookworm's
# kubernetes-client is 1.20, too old, so it is not installed here, and tests/cluster/conftest.py
# fails in CI without a kubectl that can. Images are cached in ~/.cache/metaproxy-image, keyed by
# what went into them.
IMAGE_DEBS := podman runc catatonit containernetworking-plugins mmdebstrap iptables iproute2

.PHONY: image-deps image image-test

image-deps:
	@missing=$$(for p in $(IMAGE_DEBS); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
			echo "make image-deps: install these Debian packages as root:" $$missing >&2; exit 1; \
		fi; \
		echo "apt-get install" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
	fi

# Builds (or finds in the cache) the image from the Dockerfile, its base and the workloads'
# image, and prints their sizes and build times.
image: $(STAMP) image-deps
	$(BIN)/python -m tests.cluster.images

image-test: image
	$(PYTEST) -m image tests/cluster
