"""The CPU decode step without per-op dispatch: all decoder layers, the final norm and the output head of a step
in one call of a C++ object.

A decode step (one new token per row) of a model whose projections and output head are all
`quant.cpu_linear.CpuLinear` (any `load(weights=...)` model) runs `torch.classes.llmdrop_cpu_decode.DecodeStack`
(csrc/cpu_decode.cpp): it holds the embedding and each layer's weights, gathered once, and per step looks the
tokens up, builds the rotary tables and the mask, runs every layer's norms, RoPE, KV-cache write, attention and
SwiGLU in C++ between the GEMV kernels, then the final norm and the head, computing exactly what the model's
`embed`, `context`, `DecoderLayer.forward_fused`, `norm` and `lm_head` compute. Everything else
(prefill, other models, the families whose layers are not Llama's: Qwen3, Gemma2, sliding-window Qwen2) runs the
modules as usual.
"""
from __future__ import annotations

import torch

from ..extensions import compiled_ops
from ..quant.cpu_linear import CpuEmbedding, CpuLinear
from .cache import KVCache

ops = compiled_ops("_cpu_decode", "llmdrop_cpu_decode")


def _projection_args(linear: CpuLinear | None):
    return (None, "", None) if linear is None else (linear.weight, linear.fmt, linear.bias)


def decode_stack(model):
    """The C++ stack of `model`'s layers, or None when its decode step cannot run that way."""
    cfg = model.cfg
    if ops is None or model.device.type != "cpu" or model.dtype != torch.float32:
        return None
    if not cfg.family.llama_shaped or cfg.sliding_layers:  # the C++ layer is Llama's, one window for all layers
        return None
    if not isinstance(model.embed, CpuEmbedding) or not isinstance(model.lm_head, CpuLinear) or \
            cfg.final_logit_softcapping is not None:
        return None
    for layer in model.layers:
        projections = ([layer.attn.qkv, layer.attn.o_proj] if layer.attn is not None else []) + \
                      ([layer.mlp.gate_up, layer.mlp.down] if layer.mlp is not None else [])
        if not all(isinstance(p, CpuLinear) for p in projections):
            return None
    stack = torch.classes.llmdrop_cpu_decode.DecodeStack(cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads,
                                                         cfg.head_dim)
    slot_of = KVCache.slots(model.plan)
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        stack.add_layer(None if attn is None else layer.attn_norm.weight, *_projection_args(attn and attn.qkv),
                        *_projection_args(attn and attn.o_proj),
                        None if mlp is None else layer.mlp_norm.weight, *_projection_args(mlp and mlp.gate_up),
                        *_projection_args(mlp and mlp.down), slot_of.get(layer.index, -1))
    stack.set_output(model.norm.weight, *_projection_args(model.lm_head))
    stack.set_input(model.embed.weight, model.embed.fmt, model.inv_freq, cfg.sliding_window or 0)
    return stack


def decode_logits(stack, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    """The logits [B, 1, vocab] of a decode step of `tokens` [B, 1] at `positions` [B, 1] (Transformer.forward's
    arguments)."""
    rows = tokens.shape[0]
    return stack.decode(tokens.reshape(rows), positions.reshape(rows), cache.k, cache.v, start,
                        key_valid).view(rows, 1, -1)
