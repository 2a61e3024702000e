"""The decoder stack: plain PyTorch modules, built only for the modules the drop plan keeps.

A dropped attention layer's `attn` (with its norms) is None, a dropped MLP's `mlp` (with its norms) is None:
they are never constructed and their weights are never read from disk. Every module keeps the ops (torch or
Triton, see `ops.select_ops`) it was built with. What differs between families (`llmdrop_rt.families`) arrives as
optional modules and numbers: post-norms, q/k norms, the MLP's activation, the attention scale, soft-capping,
per-layer sliding windows, the embedding scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import DropPlan, ModelConfig
from . import cpu_decode
from .attention import attention, build_mask, flash_attn_with_kvcache
from .cache import KVCache
from .ops import RopeTables, TorchOps
from .ranges import NO_LAYER_RANGES, NO_STACK_RANGES


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, ops: TorchOps):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps, self.ops = eps, ops

    def forward(self, x):
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward_(self, x, pending):
        """norm(x + pending), with x updated in place (one fused kernel on the Triton path); norm(x) when nothing
        is pending."""
        if pending is None:
            return self(x)
        return self.ops.add_rms_norm_(x, pending, self.weight, self.eps)


class OffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalised and scaled by (1 + w) in fp32, then cast (transformers' order). The stored w
    stays as the checkpoint has it; the fp32 scale is made once at load time."""

    def __init__(self, weight: torch.Tensor, eps: float, ops: TorchOps):
        super().__init__(weight, eps, ops)
        self.register_buffer("scale", 1.0 + weight.float(), persistent=False)

    def forward(self, x):
        return F.rms_norm(x.float(), self.scale.shape, self.scale, self.eps).to(x.dtype)

    def add_forward_(self, x, pending):
        if pending is not None:
            x += pending
        return self(x)


@dataclass
class StepContext:
    """What every layer of one forward step shares: rotary tables, cache, where to write, the mask."""

    rope: RopeTables
    cache: KVCache | None = None
    # Cache index of the step's first token. A 0-dim tensor instead of an int selects the static-shape path
    # (CUDA-graph capturable): see KVCache.write.
    start: int | torch.Tensor = 0
    mask: torch.Tensor | None = None  # see attention.build_mask
    attn_backend: str = "sdpa"
    # The mask of the layers in ModelConfig.sliding_layers, when not every layer slides (mask is then causal).
    sliding_mask: torch.Tensor | None = None


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> RopeTables:
    """Rotary tables at the given positions [B, T] (angles in fp32, as transformers computes them)."""
    angles = positions[..., None].float() * inv_freq
    return RopeTables(angles.cos(), angles.sin())


def step_context(cfg: ModelConfig, inv_freq: torch.Tensor, positions, cache=None, start=0, key_valid=None,
                 attn_backend="sdpa") -> StepContext:
    """A step's shared context (rotary tables + mask), also without a whole Transformer: the layer-streaming
    scorer holds no model."""
    def mask(window):
        if attn_backend == "flash" and cache is not None and key_valid is None:
            return None  # flash_attn_with_kvcache applies causality and the sliding window itself
        return build_mask(positions.shape[1], start, key_valid, window, positions.device)

    if cfg.sliding_layers is None:  # one window (or none) for every layer
        return StepContext(rope_tables(inv_freq, positions), cache, start, mask(cfg.sliding_window), attn_backend)
    return StepContext(rope_tables(inv_freq, positions), cache, start, mask(None), attn_backend,
                       mask(cfg.sliding_window) if cfg.sliding_layers else None)


class Attention(nn.Module):
    """GQA attention with RoPE; `q_norm`/`k_norm` (per-head RMSNorms before RoPE) when the family has them."""

    def __init__(self, cfg: ModelConfig, layer: int, qkv: nn.Module, o_proj: nn.Module, ops: TorchOps,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        super().__init__()
        self.layer, self.ops = layer, ops
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = qkv  # one projection producing [q | k | v]
        self.o_proj = o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.scale = cfg.attention_scale or cfg.head_dim**-0.5
        self.softcap = cfg.attn_logit_softcapping
        window = cfg.window_of(layer)
        self.sliding = cfg.sliding_layers is not None and window is not None  # reads ctx.sliding_mask
        # flash-attn's (left, right) window: a key is visible iff query - key < sliding_window.
        self.flash_window = (-1, -1) if window is None else (window - 1, 0)

    def forward(self, x, ctx: StepContext):
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k = q.view(b, t, hq, d), k.view(b, t, hkv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.ops.apply_rope(q, k, ctx.rope)
        v = v.view(b, t, hkv, d)
        if ctx.cache is not None and ctx.attn_backend == "flash" and ctx.mask is None and isinstance(ctx.start, int):
            # flash-attn appends k/v to the cache itself.
            k_cache, v_cache = ctx.cache.sequence_major(self.layer)
            out = flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=ctx.start,
                                          softmax_scale=self.scale, causal=True, window_size=self.flash_window)
            return self.o_proj(out.reshape(b, t, hq * d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer, k, v, ctx.start)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a narrower cache is read as the activations' dtype
        mask = ctx.sliding_mask if self.sliding else ctx.mask
        backend = "reference" if ctx.attn_backend == "reference" else "sdpa"
        out = attention(q, k, v, mask, self.scale, backend, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, hq * d))


class MLP(nn.Module):
    """Gated MLP: down(act(gate) * up), act SiLU (SwiGLU) or tanh-approximated GELU (GeGLU). With `folded` (the
    Triton path, SwiGLU only) its norm weight is folded into gate/up and the norm, both projections and SiLU*up run
    as one kernel; `gate_up` is then None.

    `prepare(x, pending, norm)` makes the MLP's input from the residual stream and `forward` takes it: the
    normalised stream, or for a folded MLP the stream itself (its kernel normalises)."""

    def __init__(self, gate_up: nn.Module | None, down: nn.Module, ops: TorchOps, eps: float,
                 folded: kernels.NormMLPWeights | None = None, activation: str = "silu"):
        super().__init__()
        self.gate_up = gate_up  # one projection producing [gate | up]
        self.down = down
        self.ops, self.eps, self.folded = ops, eps, folded
        self.act_mul = {"silu": ops.silu_mul, "gelu_tanh": ops.gelu_tanh_mul}[activation]
        if folded is not None:
            # Registered so param_bytes() counts it; the model is built on its device and never moved after.
            self.register_buffer("folded_gate_up", folded.gate_up, persistent=False)

    def prepare(self, x, pending, norm: RMSNorm):
        """The MLP's input for residual stream x (+ pending, added into x in place)."""
        if self.folded is None:
            return norm.add_forward_(x, pending)
        if pending is not None:
            x += pending
        return x

    def forward(self, prepared):
        if self.folded is not None:
            return self.down(self.ops.norm_swiglu(prepared, self.folded, self.eps))
        gate, up = self.gate_up(prepared).chunk(2, dim=-1)
        return self.down(self.act_mul(gate, up))


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer; `attn_post_norm` / `mlp_post_norm` (Gemma2) normalise a unit's output before it
    joins the residual stream, and belong to that unit."""

    def __init__(self, index: int, attn_norm, attn, mlp_norm, mlp, attn_post_norm=None, mlp_post_norm=None):
        super().__init__()
        self.index = index
        self.attn_norm, self.attn, self.attn_post_norm = attn_norm, attn, attn_post_norm
        self.mlp_norm, self.mlp, self.mlp_post_norm = mlp_norm, mlp, mlp_post_norm
        self.ranges = NO_LAYER_RANGES  # named profiler ranges when profiling turns them on; else no-ops

    def attn_output(self, normed, ctx: StepContext):
        """The attention unit's output for its normalised input."""
        out = self.attn(normed, ctx)
        return out if self.attn_post_norm is None else self.attn_post_norm(out)

    def mlp_output(self, prepared):
        out = self.mlp(prepared)
        return out if self.mlp_post_norm is None else self.mlp_post_norm(out)

    def attn_delta(self, x, ctx: StepContext):
        """What the attention sub-block adds to the residual stream (its LLM-Drop unit: norms + attention)."""
        return self.attn_output(self.attn_norm(x), ctx)

    def mlp_delta(self, x):
        """What the MLP sub-block (norms + MLP) adds to the residual stream."""
        return self.mlp_output(self.mlp.prepare(x, None, self.mlp_norm))

    def forward(self, x, ctx: StepContext, skip: str | None = None):
        """x -> the layer's output, x untouched (what scoring compares); `skip` leaves out its "attn", "mlp" or
        the whole "block" (what the SLEB loss measures)."""
        if self.attn is not None and skip not in ("attn", "block"):
            x = x + self.attn_delta(x, ctx)
        if self.mlp is not None and skip not in ("mlp", "block"):
            x = x + self.mlp_delta(x)
        return x

    def forward_fused(self, x, pending, ctx: StepContext):
        """The hot path. The residual stream x is updated in place, and each sub-block's output is returned as
        `pending` so that adding it is fused into the next RMSNorm instead of a separate pass."""
        ranges = self.ranges
        if self.attn is not None:
            with ranges.attn_norm:
                normed = self.attn_norm.add_forward_(x, pending)
            with ranges.attention:
                pending = self.attn_output(normed, ctx)
        if self.mlp is not None:
            with ranges.mlp_norm:
                prepared = self.mlp.prepare(x, pending, self.mlp_norm)
            with ranges.mlp:
                pending = self.mlp_output(prepared)
        return pending

    def restricted(self, plan: DropPlan) -> "DecoderLayer":
        """This layer as `plan` has it: the same modules, minus those the plan drops (nothing is copied)."""
        i = self.index
        keep_attn, keep_mlp = plan.has_attn(i), plan.has_mlp(i)
        if (keep_attn and self.attn is None) or (keep_mlp and self.mlp is None):
            raise ValueError(f"layer {i}: the plan keeps a module this layer was built without")
        attn = (self.attn_norm, self.attn, self.attn_post_norm) if keep_attn else (None, None, None)
        mlp = (self.mlp_norm, self.mlp, self.mlp_post_norm) if keep_mlp else (None, None, None)
        return DecoderLayer(i, attn[0], attn[1], mlp[0], mlp[1], attn[2], mlp[2])


def scale_embeddings(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Token embeddings as the first layer takes them: Gemma's are scaled by sqrt(hidden_size), a factor rounded
    to the activations' dtype as transformers rounds it."""
    if not cfg.family.scales_embedding:
        return x
    return x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)


def cap_logits(logits: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The output logits, soft-capped (cap * tanh(logits / cap)) when the family caps them."""
    cap = cfg.final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


class Transformer(nn.Module):
    """`embed` maps token ids to activations and `lm_head` activations to logits (for tied embeddings the two share
    one stored table, never a second copy)."""

    def __init__(self, cfg: ModelConfig, plan: DropPlan, embed: nn.Module, layers, norm: RMSNorm, lm_head: nn.Module):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = lm_head
        self.register_buffer("inv_freq", cfg.rope.inverse_frequencies(cfg.head_dim), persistent=False)
        self.ranges = NO_STACK_RANGES  # see DecoderLayer.ranges
        self.decode_stack = cpu_decode.decode_stack(self)  # a CPU decode step in one C++ call, or None
        self.kv_dtype = self.dtype  # the KV cache's dtype (load's kv_cache)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (weights may be stored in other formats)."""
        return self.norm.weight.dtype

    @property
    def ops(self) -> TorchOps:
        return self.norm.ops

    def rope_tables(self, positions: torch.Tensor) -> RopeTables:
        return rope_tables(self.inv_freq, positions)

    def context(self, positions, cache=None, start=0, key_valid=None, attn_backend="sdpa") -> StepContext:
        """Everything the layers of one step share, built once: rotary tables and the attention mask."""
        return step_context(self.cfg, self.inv_freq, positions, cache, start, key_valid, attn_backend)

    def forward(self, tokens, positions, cache=None, start=0, key_valid=None, attn_backend="sdpa", last_only=False):
        """Logits for `tokens` [B, T] at rotary `positions` [B, T].

        With a cache, K/V are written at cache indices start..start+T-1 and attention reads 0..start+T-1;
        `key_valid` [B, >=start+T] marks padding (False) to be masked out.
        """
        if self.decode_stack is not None and tokens.shape[1] == 1 and cache is not None and \
                isinstance(start, int) and attn_backend == "sdpa":
            return cpu_decode.decode_logits(self.decode_stack, tokens, positions, cache, start, key_valid)
        return self.run(tokens, self.context(positions, cache, start, key_valid, attn_backend), last_only)

    def run(self, tokens, ctx: StepContext, last_only=False):
        """Logits for `tokens` under a prepared step context, through the modules."""
        with self.ranges.embedding:
            x = scale_embeddings(self.embed(tokens), self.cfg)
        pending = None
        for layer in self.layers:
            pending = layer.forward_fused(x, pending, ctx)
        if last_only:
            x = x[:, -1:].contiguous()
            pending = None if pending is None else pending[:, -1:]
        with self.ranges.final_norm:
            normed = self.norm.add_forward_(x, pending)
        with self.ranges.lm_head:
            return cap_logits(self.lm_head(normed), self.cfg)
