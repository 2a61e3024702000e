"""The one table of Hugging Face checkpoint tensor names for Llama-family decoder stacks (the norms that differ
between families are in `llmdrop_rt.families`).

Every reader and writer of checkpoints (the model builder, the exporter, the quantizer's exclusion rules, the GGUF
importer) names tensors through this module, so the scheme lives in one place.
"""
from __future__ import annotations

import re

from ..families import LLAMA, Family

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Modules inside a decoder layer, relative to its prefix. A Llama layer's attention unit is its input norm +
# self_attn; its MLP unit is the post-attention norm + mlp (LLM-Drop's units: dropping one drops both parts).
# Other families' units: Family.unit_parts.
ATTN_NORM = LLAMA.attn_norm
MLP_NORM = LLAMA.mlp_norm
ATTN = "self_attn"
MLP = "mlp"
ATTN_PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "o": "self_attn.o_proj"}
MLP_PROJECTIONS = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
QK_NORMS = {"q": "self_attn.q_norm", "k": "self_attn.k_norm"}  # the families with Family.qk_norm

_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); None for a tensor outside the layers."""
    match = _LAYER_TENSOR.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def unit_of(rest: str, family: Family = LLAMA) -> str | None:
    """Which unit ('attn' or 'mlp') a layer-relative tensor name belongs to, None for anything else."""
    return next((unit for unit, parts in family.unit_parts.items() if rest.startswith(parts)), None)


def module_regex(layer: int, unit: str) -> str:
    """A regex matching the module names of one layer's attention ('attn') or MLP ('mlp') from their start."""
    return re.escape(f"{layer_prefix(layer)}.{ATTN if unit == 'attn' else MLP}.")
