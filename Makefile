# The two commands of the README: `make run` and `make test`. Both install what they need on a
# fresh Debian 12 machine (apt packages as root, the .venv, pip) before doing their work.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# Embedded defaults for `make run`; every BRIDGE_* setting can be overridden from the environment.
export BRIDGE_DOMAIN ?= localhost
export BRIDGE_DATA_DIR ?= $(CURDIR)/var

APT_RUN := redis-server
# prometheus: for promtool, which checks postal_config/monitoring (its own service is not used);
# ruby: to check postal_config/console.rb (ruby -wc and its retention logic).
APT_TEST := redis-server knot knot-dnsutils ceph-mon ceph-osd radosgw nodejs npm wrk curl prometheus ruby

.PHONY: run test bench lint format apt-run apt-test apt-install clean

run: apt-run $(VENV)/.run-deps
	$(PY) -m bridge run

test: apt-test $(VENV)/.test-deps tests/referee/node_modules/.installed
	$(VENV)/bin/ruff check bridge tests bench wsgi.py gunicorn.conf.py
	$(VENV)/bin/mypy bridge
	$(PY) -m pytest -q

bench: apt-test $(VENV)/.test-deps
	$(PY) -m bench
	$(PY) -m bench.outbound
	$(PY) -m bench.mtp

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check bridge tests bench wsgi.py gunicorn.conf.py
	$(VENV)/bin/ruff format --check bridge tests bench wsgi.py gunicorn.conf.py

format: $(VENV)/.test-deps
	$(VENV)/bin/ruff format bridge tests bench wsgi.py gunicorn.conf.py

# Install Debian packages only when one is missing (apt-get needs root; CI and `make` run as root here).
apt-run:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_RUN)"

apt-test:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_TEST)"

# Node.js may come from elsewhere than Debian (as on these machines): keep it when it is there.
apt-install:
	@missing=$$(for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if command -v node >/dev/null && command -v npm >/dev/null; then missing=$$(echo "$$missing" | grep -vxE 'nodejs|npm'); fi; \
	missing=$$(echo $$missing); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# The package itself goes in editable (its console script .venv/bin/mailio-bridge runs this tree's code).
$(VENV)/.run-deps: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-dev.txt pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@ $(VENV)/.run-deps

tests/referee/node_modules/.installed: tests/referee/package.json tests/referee/package-lock.json
	npm ci --prefix tests/referee --no-audit --no-fund --silent
	touch $@

clean:
	rm -rf $(VENV) tests/referee/node_modules .pytest_cache .ruff_cache
