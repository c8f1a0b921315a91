# Two entry points for a fresh machine: `make run` and `make test`.
# Both bootstrap .venv (pinned by constraints.txt) and node_modules (pinned by package-lock.json).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PY_STAMP := $(VENV)/.loraledger-installed
NODE_STAMP := node_modules/.loraledger-installed
MODEL ?= tiny
# the real-model demo (`make run MODEL=smollm2`) keeps its own state: another base model, other adapters
STATE ?= $(if $(filter tiny,$(MODEL)),.loraledger,.loraledger-$(MODEL))

.PHONY: run test deps stop compile protos clean

HAPROXY := .tools/bin/haproxy

deps: $(PY_STAMP) $(NODE_STAMP) $(HAPROXY)

# HAProxy for the fleet's proxy and its tests: Debian's package unpacked under .tools/ (no root needed)
$(HAPROXY): scripts/fleet/install_haproxy.sh
	sh scripts/fleet/install_haproxy.sh .tools

$(PY_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# `npm install` from the committed lock (not `npm ci`): the lock pins every version, but the registry mirror
# these machines use lacks the other platforms' optional anvil/forge binaries, which makes `npm ci` refuse it.
$(NODE_STAMP): package.json package-lock.json
	npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

run: deps
	$(VENV)/bin/loraledger demo --state-dir $(STATE) --model $(MODEL)

# Stops the demo's node (it drains and exits), then its devnet.
stop: deps
	$(VENV)/bin/loraledger demo --stop --state-dir $(STATE)

test: deps
	$(PY) -m pytest -q

compile: deps
	$(VENV)/bin/loraledger contracts compile

protos: deps
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) node_modules $(STATE) .loraledger-smollm2 .tools
