# vlbridge: `make run` starts the service, `make test` runs lint, type checks and tests.
# Both create .venv on first use (torch first: scripts/torch_choice.py picks the CPU or the CUDA
# build, see README; TORCH=cpu|cuda overrides it) and reuse it after.
# `make chat Q="..." IMG=picture.png` asks the running service; without Q it is interactive.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vlbridge-installed
TORCH  ?= $(or $(TORCH_BUILD),auto)
CONFIG ?= vlbridge.toml

.PHONY: run chat test lint typecheck pytest bench-cpu clean install

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	torch="$$($(BIN)/python scripts/torch_choice.py --build $(TORCH))" && \
		$(BIN)/python -m pip install --quiet $$torch
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vlbridge serve --config $(CONFIG) $(if $(PORT),--port $(PORT))

chat: $(STAMP)
	$(BIN)/vlbridge chat $(if $(PORT),--url ws://127.0.0.1:$(PORT)/ws) $(if $(IMG),--image "$$IMG") $(if $(Q),"$$Q")

lint: $(STAMP)
	$(BIN)/ruff check bot client protocol server tests bench scripts
	$(BIN)/ruff format --check bot client protocol server scripts
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
