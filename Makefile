# voicerelay: `make run` starts the local stack, `make test` installs everything and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: install install-system run test test-fast bench bench-setup lint clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[agent]'
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(PIP) install -q -e '.[agent,test]'
	touch $@

install-system:            ## Debian packages: redis-server, chromium, firefox-esr, nftables, node (tests), espeak-ng (the agent), clang, libbpf-dev, ethtool (kernel fast path)
	bash scripts/install-system-deps.sh

WERIFT := tests/e2e/werift
$(WERIFT)/node_modules/.installed: $(WERIFT)/package.json $(WERIFT)/package-lock.json
	npm ci --prefix $(WERIFT) --no-audit --no-fund --loglevel=error
	touch $@

install: install-system $(VENV)/.test $(WERIFT)/node_modules/.installed   ## everything: system packages, venv, test deps (werift from npm)

run: $(VENV)/.runtime      ## the whole local stack on embedded defaults (installs espeak-ng if missing)
	@command -v espeak-ng >/dev/null 2>&1 || bash scripts/install-system-deps.sh espeak-ng
	$(VENV)/bin/relayctl up

test: install              ## install everything, then the default suite
	$(PY) -m pytest -q

# The pure tests of tests/relay and tests/cli (their other files start relays and stacks).
RELAY_UNIT := tests/relay/test_router.py tests/relay/test_mmsg.py tests/relay/test_control.py \
              tests/relay/test_net.py tests/relay/test_spawn.py
CLI_UNIT   := tests/cli/test_options.py tests/cli/test_turns.py tests/cli/test_addresses.py \
              tests/cli/test_https.py

test-fast: $(VENV)/.test   ## unit tests only (no relay processes, no browser)
	$(PY) -m pytest -q tests/wire tests/shm $(RELAY_UNIT) $(CLI_UNIT) tests/transceiver -m 'not browser'

bench-setup:               ## the peers the side-by-side benchmarks run against (Debian coturn, janus)
	bash bench/peers_setup.sh

bench: install bench-setup ## benchmarks: print tables, write bench/results/*.json (BENCH_ARGS=--quick)
	$(PY) bench/run_all.py $(BENCH_ARGS)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check voicerelay tests bench
	$(VENV)/bin/ruff format --check voicerelay tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis bench/build bench/results $(WERIFT)/node_modules
