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

.PHONY: demo test fuzz install install-test lint bench synth-example clean

demo: install
	$(WS) pull $(DEFAULT_MODEL)
	$(WS) demo

test: install-test
	$(WS) pull $(DEFAULT_MODEL)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/lint-imports --no-cache
	@# Bytecode for the package up front: where PYTHONDONTWRITEBYTECODE is set, every process the
	@# suite starts (CLI runs, training ranks) would otherwise compile it again (~0.4 s each).
	$(PY) -m compileall -q src
	@# The slowest tests are listed at the end, so a CI log says where the suite's time goes.
	$(VENV)/bin/pytest --durations=25

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

# README "synth", "It helps": 20 seed examples -> self-instruct -> a LoRA fork -> eval against the base
# (builtin:in-short-heldout, McNemar). About an hour on two busy CPU cores; SYNTH_OUT holds every step.
SYNTH_OUT ?= runs/in-short
IN_SHORT := src/weightsmith/datasets/in-short
synth-example: SHELL := /bin/bash
synth-example: install
	$(WS) pull $(DEFAULT_MODEL)
	$(WS) synth self-instruct --seed $(IN_SHORT)/seeds.jsonl --model $(DEFAULT_MODEL) --n 100 \
	    --templates $(IN_SHORT) --answer-pattern '^In short: [^\n]+$$' --stop $$'\n' --max-tokens 40 \
	    --batch-size 48 --random-seed 0 --out $(SYNTH_OUT)/data
	$(WS) finetune $(DEFAULT_MODEL) --data $(SYNTH_OUT)/data/train.jsonl --valid $(SYNTH_OUT)/data/validation.jsonl \
	    --out $(SYNTH_OUT)/fork --train.max-steps 50 --train.batch-size 4 --train.lr 2e-3 \
	    --train.eval-every 25 --train.save-every 25
	$(WS) eval $(DEFAULT_MODEL) --adapter $(SYNTH_OUT)/fork --compare base --tasks builtin:in-short-heldout \
	    --apply-chat-template --out $(SYNTH_OUT)/eval

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
