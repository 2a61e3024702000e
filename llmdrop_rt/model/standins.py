"""Dropped modules expressed inside *transformers'* Llama/Mistral models, for the tools that run them there.

Stock transformers has no way to leave a module out, so the quantizer, the baselines of the bench and the tests'
reference models swap in weightless modules that add nothing to the residual stream. `skip_attention` is
LLM-Drop's own approach: the attention still holds its weights but its forward adds nothing.
"""
from __future__ import annotations

import torch
from torch import nn


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
    `.layers`) by the stand-ins; with `replace_norms` their input norms become Identity too (no weights left)."""
    for i in drop_attn:
        layer = model.layers[i]
        layer.self_attn = ZeroAttention()
        if replace_norms:
            layer.input_layernorm = nn.Identity()
    for i in drop_mlp:
        layer = model.layers[i]
        layer.mlp = ZeroMLP()
        if replace_norms:
            layer.post_attention_layernorm = nn.Identity()
    return model


def skip_attention(layer: nn.Module) -> None:
    """LLM-Drop's transformers approach: the layer's attention is skipped in the forward, its weights stay."""
    layer.self_attn.forward = ZeroAttention().forward
