"""The CPU decode step without per-op dispatch: each decoder layer runs as one call of a C++ op.

A decode step (one new token per row) of a model whose projections are all `quant.cpu_linear.CpuLinear` (any
`load(weights=...)` model) runs `torch.ops.llmdrop_cpu_decode.decode_layer` per layer (csrc/cpu_decode.cpp): the
norms, RoPE, the KV-cache write, attention and SwiGLU happen in C++ between the GEMV kernels, computing exactly
what `DecoderLayer.forward_fused` computes. Everything else (prefill, other models, the families whose layers are
not Llama's: Qwen3, Gemma2, sliding-window Qwen2) runs the modules as usual.
"""
from __future__ import annotations

import torch

from ..extensions import compiled_ops
from ..quant.cpu_linear import CpuLinear

ops = compiled_ops("_cpu_decode", "llmdrop_cpu_decode")


def _projection_args(linear: CpuLinear | None):
    return (None, "", None) if linear is None else (linear.weight, linear.fmt, linear.bias)


class LayerCall:
    """One decoder layer's fixed arguments, gathered once; `__call__` adds the step's."""

    def __init__(self, layer, cfg):
        attn, mlp = layer.attn, layer.mlp
        self.layer = layer.index
        self.has_attn = attn is not None
        self.attn_args = (None if attn is None else layer.attn_norm.weight, *_projection_args(attn and attn.qkv),
                          *_projection_args(attn and attn.o_proj))
        self.mlp_args = (None if mlp is None else layer.mlp_norm.weight, *_projection_args(mlp and mlp.gate_up),
                         *_projection_args(mlp and mlp.down))
        self.shape_args = (cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def __call__(self, x, pending, ctx, cos, sin, mask):
        k_cache, v_cache = ctx.cache.layer(self.layer) if self.has_attn else (None, None)
        return ops.decode_layer(x, pending, *self.attn_args, k_cache, v_cache, ctx.start, cos, sin, mask,
                                *self.mlp_args, *self.shape_args)


def layer_calls(model) -> list[LayerCall] | None:
    """The C++ calls for `model`'s layers, or None when its decode step cannot run that way."""
    cfg = model.cfg
    if ops is None or model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    if not cfg.family.llama_shaped or cfg.sliding_layers:  # the C++ layer is Llama's, one window for all layers
        return None
    for layer in model.layers:
        projections = ([layer.attn.qkv, layer.attn.o_proj] if layer.attn is not None else []) + \
                      ([layer.mlp.gate_up, layer.mlp.down] if layer.mlp is not None else [])
        if not all(isinstance(p, CpuLinear) for p in projections):
            return None
    return [LayerCall(layer, model.cfg) for layer in model.layers]


def decode_layers(calls: list[LayerCall], x: torch.Tensor, ctx) -> torch.Tensor:
    """Run every layer's decode step on x [B, 1, hidden] (updated in place); returns the last layer's pending."""
    rows = x.shape[0]
    x2 = x.view(rows, -1)
    cos, sin = ctx.rope.cos.reshape(rows, -1), ctx.rope.sin.reshape(rows, -1)
    mask = None if ctx.mask is None else ctx.mask.reshape(ctx.mask.shape[0], -1).expand(rows, -1).contiguous()
    pending = None
    for call in calls:
        pending = call(x2, pending, ctx, cos, sin, mask)
    return pending.view(rows, 1, -1)
