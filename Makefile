# The job's developer commands. `make` alone lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch installs first, on its own: the CPU build for tests and dry runs. Elsewhere than these machines,
# point TORCH_INDEX at PyTorch's CPU wheel index to avoid the multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: help  ## list the targets
help:
	@grep -E '^\.PHONY: [a-z-]+ +## ' $(MAKEFILE_LIST) | sed -E 's/^\.PHONY: ([a-z-]+) +## (.*)/  make \1\t\2/' | expand -t 22

.PHONY: setup  ## create .venv with the CPU dependency set and the dev tools (Python 3.11+)
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: demo  ## dry-run the job end to end against a local S3 server on the bundled sample data
demo: setup
	$(BIN)/python demo/run.py

.PHONY: test  ## run the test suite (CPU; starts its own S3 server)
test: setup
	$(BIN)/python -m pytest -q tests

.PHONY: lint  ## ruff: lint and format check
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: bench-dry-run  ## time the dry run on 1,000 rows (the contract: under two minutes on two cores)
bench-dry-run: setup
	$(BIN)/python bench/dry_run.py

.PHONY: clean  ## remove .venv, demo outputs and caches
clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
