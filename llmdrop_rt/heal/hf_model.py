"""transformers' model of a (dropped) checkpoint folder, the dropped modules as weightless stand-ins.

Stock transformers cannot leave a module out (`from_pretrained` would fill a dropped module's missing weights with
random values), so the model is built from the config, the modules the plan drops are swapped for
`model.standins`' ZeroAttention / ZeroMLP (their norms Identity) before any weight is read, and exactly the kept
modules' tensors are then read from the safetensors files, strictly: a missing or mis-shaped one is an error. We
parse the config ourselves and hand transformers a Llama/Mistral config (a DeciLM folder is the Llama stack it
describes), so no code from the folder ever runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import DropPlan, ModelConfig
from ..io.checkpoint import CheckpointError, CheckpointReader
from ..io.export import DECILM_ONLY_FIELDS
from ..model import hf_names
from ..model.standins import drop_in_transformers

# The families whose transformers model this module builds (a DeciLM folder is a Llama stack).
HEALABLE_FAMILIES = ("llama", "mistral")
# Fields of our configs that say what is dropped: the stand-ins express them, transformers' config has no use for them.
DROP_FIELDS = ("drop_attn_list", "drop_mlp_list")


def transformers_config(cfg: ModelConfig):
    """The LlamaConfig / MistralConfig of a parsed config (a DeciLM config's per-block shapes made global)."""
    from transformers import LlamaConfig, MistralConfig

    config_class = MistralConfig if cfg.architecture == "mistral" else LlamaConfig
    fields = {k: v for k, v in cfg.raw.items() if k not in (*DECILM_ONLY_FIELDS, *DROP_FIELDS)}
    fields.update(architectures=[config_class.__name__.replace("Config", "ForCausalLM")],
                  model_type=config_class.model_type, num_key_value_heads=cfg.num_kv_heads,
                  intermediate_size=cfg.intermediate_size, head_dim=cfg.head_dim)
    return config_class.from_dict(fields)


def load_transformers_model(folder: str | Path, plan: DropPlan | None = None, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> nn.Module:
    """transformers' CausalLM of the checkpoint at `folder` with `plan` (default: its config's) applied: the
    dropped modules are stand-ins without parameters, every other weight is the folder's, in `dtype`."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    cfg = ModelConfig.from_folder(folder)
    plan = plan if plan is not None else DropPlan.from_config(cfg)
    if plan.num_layers != cfg.num_layers:
        raise ValueError(f"the drop plan is for {plan.num_layers} layers, {folder} has {cfg.num_layers}")
    reader = CheckpointReader(folder)
    model = AutoModelForCausalLM.from_config(transformers_config(cfg), attn_implementation=attn_implementation,
                                             dtype=dtype)
    drop_in_transformers(model.model, sorted(plan.drop_attn), sorted(plan.drop_mlp))
    tied_head = cfg.tie_word_embeddings and not reader.has(hf_names.LM_HEAD)
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == hf_names.LM_HEAD and tied_head:
            continue  # the embedding, shared
        if not reader.has(name):
            raise CheckpointError(f"{folder}: tensor '{name}' of a kept module is missing from the checkpoint")
        weights[name] = reader.get(name, tuple(tensor.shape)).to(dtype)
    model.load_state_dict(weights, strict=not tied_head)
    return model.to(device).eval()
