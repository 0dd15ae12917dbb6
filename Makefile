# Two commands do all the set-up on a fresh machine with Python >= 3.10:
#   make demo   creates .venv, installs torch 2.13.0 (CPU) first, then sleepzoo, then runs the demo
#   make test   same environment plus the eval extra (lm-evaluation-harness), runs the test suite (fast
#               tests; `make test-slow` runs the slow ones)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: sleepzoo's own range (torch>=2.4) would otherwise pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.sleepzoo-installed
# The tests also run the lm-evaluation-harness integration offline: `make test` adds the eval extra.
EVAL_STAMP := $(VENV)/.sleepzoo-eval-installed

.PHONY: demo test test-slow bench env clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)

$(EVAL_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,eval]'
	touch $(EVAL_STAMP)

demo: $(STAMP)
	$(BIN)/sleepzoo demo --out runs/demo

test: $(EVAL_STAMP)
	$(BIN)/python -m pytest

test-slow: $(EVAL_STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-only -o addopts=""

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
