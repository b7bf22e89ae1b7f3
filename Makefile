# The project's command vocabulary. CI runs `make test` (via .ci/run) on a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PORT   ?= 8080

.PHONY: dev test lint fmt bench bench-instructions bench-interleave bench-floor soak assurance clean docs

include deploy/deploy.mk

$(STAMP): pyproject.toml constraints.txt
	@# Debian splits venv/ensurepip out of python3: install it when missing (as root).
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	  else echo "make: $(PYTHON) lacks venv/ensurepip: install python3-venv" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev,fast]'
	touch $(STAMP)

## dev: the gateway on :$(PORT) in front of a local SME stand-in, with tokens and curl lines
dev: $(STAMP)
	$(VENV)/bin/catalyst-proxy dev --port $(PORT)

## test: lint, type-check, every test (chart checks included), then the container for real;
## the tests' Debian packages (tests/test-packages.txt: redis-server, curl) are installed first
test: $(STAMP) lint deploy-tools
	bash tests/install-test-packages.sh
	$(PY) -m pytest -q
	$(MAKE) container-check

LINT_PATHS := catalyst_proxy tests $(wildcard bench)
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

## assurance: run the attack, fault, leak, JWKS and fuzz suites and print their figures
ASSURANCE_SUITES := tests/test_attacks_tokens.py tests/test_jwks.py tests/test_faults.py tests/test_logging.py tests/test_fuzz.py
assurance: $(STAMP)
	@mkdir -p .cache
	CATALYST_ASSURANCE_OUT=.cache/assurance.json $(PY) -m pytest -q $(ASSURANCE_SUITES)
	@$(PY) tests/assurance_report.py .cache/assurance.json

## docs: rebuild the generated tables of README.md and docs/reference.md from the code
docs: $(STAMP)
	$(PY) -m catalyst_proxy.devtools.reference

fmt: $(STAMP)
	$(VENV)/bin/ruff format $(LINT_PATHS)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info

## bench: gateway vs a direct hit and a Go reference, plus rate-limit and idempotency rows (wrk,
## nginx, Go + golang-jwt, redis-server, installed by apt-get when missing: needs root or
## preinstalled packages); e.g. make bench BENCH_ARGS='--workers 2'
BENCH_ARGS ?=
bench: $(STAMP)
	sh bench/install-tools.sh
	$(PY) bench/bench.py $(BENCH_ARGS)

## bench-instructions: what a new Idempotency-Key on every request costs the gateway (memory
## store), counted by valgrind's callgrind instead of timed: the same ratio in every run (~3 min)
bench-instructions: $(STAMP)
	sh bench/install-tools.sh
	$(PY) bench/instructions.py $(BENCH_ARGS)

## bench-interleave: a few make bench rows in short slices, interleaved, CPU per request against
## the first (default: keys off, the known-cost row, keys on, keys on with a 64 KiB store; ~4 min)
bench-interleave: $(STAMP)
	sh bench/install-tools.sh
	$(PY) bench/interleave.py $(BENCH_ARGS)

## bench-floor: latency at 500 requests/s of two servers that only answer (httptools, aiohttp's
## low-level server) and of the gateway's hot path behind httptools (bench/lean.py), next to
## the direct hit, go-reference and the gateway (~5 min)
bench-floor: $(STAMP)
	sh bench/install-tools.sh
	$(PY) bench/floor.py $(BENCH_ARGS)

## soak: mixed good/bad/faulty load under python -X dev; e.g. make soak SOAK_SECONDS=60
SOAK_SECONDS ?= 600
SOAK_ARGS ?=
soak: $(STAMP)
	@mkdir -p .cache
	$(PY) bench/soak.py --seconds $(SOAK_SECONDS) $(SOAK_ARGS) > .cache/soak-latest.md; \
	  status=$$?; cat .cache/soak-latest.md; exit $$status
