# vlbridge: `make run` starts the service, `make test` runs lint, type checks and tests.
# Both create .venv on first use (torch first: the CPU wheel, see README) and reuse it after.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vlbridge-installed
TORCH  ?= torch==2.13.0
CONFIG ?= vlbridge.toml

.PHONY: run test lint typecheck pytest bench-cpu clean install

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vlbridge serve --config $(CONFIG)

lint: $(STAMP)
	$(BIN)/ruff check bot client protocol server tests bench
	$(BIN)/ruff format --check bot client protocol server
	$(BIN)/lint-imports  # the import rules of docs/architecture.md

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench-cpu: $(STAMP)
	$(BIN)/python bench/executor.py --device cpu

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data test-artifacts
