"""Dropped modules expressed inside *transformers'* models of our families, for the tools that run them there.

Stock transformers has no way to leave a module out, so the quantizer, the baselines of the bench and the tests'
reference models swap in weightless modules that add nothing to the residual stream. `skip_attention` is
LLM-Drop's own approach: the attention still holds its weights but its forward adds nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..families import family_of


class ZeroAttention(nn.Module):
    """Stands in for a dropped `self_attn`: no weights, adds nothing (returns transformers' (output, weights))."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class ZeroMLP(nn.Module):
    """Stands in for a dropped `mlp`: no weights, adds nothing."""

    def forward(self, hidden_states):
        return torch.zeros_like(hidden_states)


def drop_in_transformers(model: nn.Module, drop_attn=(), drop_mlp=(), replace_norms: bool = True) -> nn.Module:
    """Replace, in place, the listed layers' attention / MLP of a transformers `...Model` (the decoder stack, with
    `.layers`) by the stand-ins; with `replace_norms` the unit's norms (the family's pre- and post-norms) become
    Identity too, so no weights are left. (A post-norm of the stand-in's zeros is zero either way.)"""
    config = model.config
    family = family_of(getattr(config, "architectures", None) or [], config.model_type)
    if family is None:
        raise ValueError(f"transformers model of type {config.model_type!r} is not one of our families")
    units = ((drop_attn, "self_attn", ZeroAttention, (family.attn_norm, family.attn_post_norm)),
             (drop_mlp, "mlp", ZeroMLP, (family.mlp_norm, family.mlp_post_norm)))
    for layers, module, standin, norms in units:
        for i in layers:
            layer = model.layers[i]
            setattr(layer, module, standin())
            for norm in filter(None, norms) if replace_norms else ():
                setattr(layer, norm, nn.Identity())
    return model


def skip_attention(layer: nn.Module) -> None:
    """LLM-Drop's transformers approach: the layer's attention is skipped in the forward, its weights stay."""
    layer.self_attn.forward = ZeroAttention().forward
