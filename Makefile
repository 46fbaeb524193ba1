# Two entry points: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch 2.13.0 lies on disk on our machines; elsewhere set TORCH_SPEC
# to the build you want (e.g. TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu').
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
WS := $(VENV)/bin/weightsmith
DEFAULT_MODEL ?= smollm2-135m-instruct

.PHONY: demo test fuzz install install-test lint bench clean

demo: install
	$(WS) pull $(DEFAULT_MODEL)
	$(WS) demo

test: install-test
	$(WS) pull $(DEFAULT_MODEL)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/pytest

# Only the fuzz tests (pytest -m fuzz), with many examples each; `make test` runs a few.
FUZZ_EXAMPLES ?= 2000
fuzz: install-test
	WEIGHTSMITH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -m fuzz

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so the package's `torch>=2.4` range is already satisfied.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -e '.[client]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache

bench: install-test
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
