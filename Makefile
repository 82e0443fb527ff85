# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
JS_STAMP := tests/js/node_modules/.installed

.PHONY: demo test check lint typecheck bench clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

demo: $(STAMP)
	$(BIN)/metaproxy demo

# System tools some tests use: iproute2 (network namespaces), promtool from prometheus (alert
# rule tests) and redis-server (the fleet's shared store; valkey-server serves as well).
# Installed when we are root on Debian (CI is); otherwise those tests skip and say why.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { ! command -v ip >/dev/null || ! command -v promtool >/dev/null || \
	      { ! command -v valkey-server >/dev/null && ! command -v redis-server >/dev/null; }; }; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		  --no-install-recommends iproute2 prometheus redis-server >/dev/null; \
	fi

test: $(STAMP) $(JS_STAMP) system-deps
	$(BIN)/pytest -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff format --check metaproxy tests bench
	$(BIN)/ruff check metaproxy tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

# Load generators and the reference server come from Debian (loopback only).
bench: $(STAMP)
	@command -v wrk >/dev/null && command -v h2load >/dev/null && command -v nginx >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		 --no-install-recommends wrk nghttp2-client nginx-light)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) tests/js/node_modules
