# The project's command vocabulary. CI runs `make test` (via .ci/run) on a clean clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PORT   ?= 8080

.PHONY: dev test lint fmt bench soak assurance clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev,fast]'
	touch $(STAMP)

## dev: the gateway on :$(PORT) in front of a local SME stand-in, with tokens and curl lines
dev: $(STAMP)
	$(VENV)/bin/catalyst-proxy dev --port $(PORT)

## test: lint, type-check and every test
test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check catalyst_proxy tests bench
	$(VENV)/bin/ruff format --check catalyst_proxy tests bench
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format catalyst_proxy tests bench
	$(VENV)/bin/ruff check --fix catalyst_proxy tests bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
