# iscam -- reproducible companion of the IS-CAM paper.  `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first, pinned to the builds this project is tested with;
# the package metadata itself only has lower bounds.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Data root: models and images the project reads but never ships (see README).
ISCAM_DATA ?= $(abspath ../shared/assets)
export ISCAM_DATA
PYTEST_ARGS ?=

.PHONY: help venv test test-all bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.stamp-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.stamp-test ## create .venv with the package and its test extras

test: $(VENV)/.stamp-test ## set up .venv if needed and run the test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.stamp-test ## the test suite including slow tests
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

bench: $(VENV)/.stamp-test ## CPU benchmarks against TorchCAM (tables in benchmarks/results/)
	$(PY) benchmarks/methods_cpu.py
	$(PY) benchmarks/metrics_cpu.py

clean: ## remove build outputs (keeps .venv and results/)
	rm -rf book/_build notebooks/executed .pytest_cache
