"""Shared fixtures: tiny random checkpoints (see helpers.py) and the embedded default model.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read when a
kernel is decorated, so it is set here, before anything imports `llmdrop_rt.kernels`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_MODELS, TINY_MODELS, make_checkpoint

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    folders = {}
    for seed, (name, make_config) in enumerate(TINY_MODELS.items()):
        folder = make_checkpoint(root / name, make_config(), seed=seed,
                                 max_shard_size="20KB" if name == "sharded" else None)
        folders[name] = folder
    # The sharded model also exercises the pre-transformers-5 spelling: rope_theta + rope_scaling{type}.
    cfg_path = folders["sharded"] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {"type": "linear", "factor": params["factor"]}
    cfg_path.write_text(json.dumps(cfg))
    return folders


@pytest.fixture(params=list(TINY_MODELS))
def tiny(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: make_checkpoint(root / name, make_config(), seed=10 + seed)
            for seed, (name, make_config) in enumerate(FAMILY_MODELS.items())}


@pytest.fixture(params=list(FAMILY_MODELS))
def family(request, family_checkpoints) -> Path:
    return family_checkpoints[request.param]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted once into the user cache (as `make bench` does)."""
    from llmdrop_rt.io.gguf_import import default_model_path

    return default_model_path()
