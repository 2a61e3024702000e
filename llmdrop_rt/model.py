"""The decoder stack: plain PyTorch modules, built only for the modules the drop plan keeps.

A dropped attention layer's `attn` (with its input norm) is None, a dropped MLP's `mlp` (with its norm) is None:
they are never constructed and their weights are never read from disk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels

from . import ops
from .attention import attention, build_mask, flash_attn_with_kvcache
from .cache import KVCache
from .checkpoint import CheckpointReader
from .config import DropPlan, ModelConfig
from .profiling import NO_LAYER_RANGES, NO_STACK_RANGES
from .quant import QuantLinear, parse_quant_config


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


@dataclass
class StepContext:
    """What every layer of one forward step shares: rotary tables, cache, where to write, the mask."""

    rope: ops.RopeTables
    cache: KVCache | None = None
    # Cache index of the step's first token. A 0-dim tensor instead of an int selects the static-shape path
    # (CUDA-graph capturable): K/V written by index_copy_, attention over the whole cache under `mask`.
    start: int | torch.Tensor = 0
    mask: torch.Tensor | None = None  # see attention.build_mask
    attn_backend: str = "sdpa"


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> ops.RopeTables:
    """Rotary tables at the given positions [B, T] (angles in fp32, as transformers computes them)."""
    angles = positions[..., None].float() * inv_freq
    return ops.RopeTables(angles.cos(), angles.sin())


def step_context(cfg: ModelConfig, inv_freq: torch.Tensor, positions, cache=None, start=0, key_valid=None,
                 attn_backend="sdpa") -> StepContext:
    """A step's shared context (rotary tables + mask), also without a whole Transformer: the layer-streaming
    scorer holds no model."""
    if attn_backend == "flash" and cache is not None and key_valid is None:
        mask = None  # flash_attn_with_kvcache applies causality and the sliding window itself
    else:
        mask = build_mask(positions.shape[1], start, key_valid, cfg.sliding_window, positions.device)
    return StepContext(rope_tables(inv_freq, positions), cache, start, mask, attn_backend)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, qkv: nn.Module, o_proj: nn.Module):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = qkv  # one projection producing [q | k | v]
        self.o_proj = o_proj
        self.scale = cfg.head_dim**-0.5
        # flash-attn's (left, right) window: a key is visible iff query - key < sliding_window.
        self.flash_window = (-1, -1) if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)

    def forward(self, x, ctx: StepContext):
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q, k = ops.apply_rope(q.view(b, t, hq, d), k.view(b, t, hkv, d), ctx.rope)
        if ctx.cache is not None and ctx.attn_backend == "flash" and ctx.mask is None and isinstance(ctx.start, int):
            # flash-attn appends k/v to the cache itself; it wants [B, S, H, D], a transposed view of our slots.
            k_cache, v_cache = ctx.cache.layer(self.layer)
            out = flash_attn_with_kvcache(
                q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), k=k, v=v.view(b, t, hkv, d),
                cache_seqlens=ctx.start, softmax_scale=self.scale, causal=True, window_size=self.flash_window)
            return self.o_proj(out.reshape(b, t, hq * d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, hkv, d).transpose(1, 2)
        if ctx.cache is not None:
            k_cache, v_cache = ctx.cache.layer(self.layer)
            if isinstance(ctx.start, torch.Tensor):
                index = ctx.start + torch.arange(t, device=x.device)
                k_cache.index_copy_(2, index, k)
                v_cache.index_copy_(2, index, v)
                k, v = k_cache, v_cache
            else:
                end = ctx.start + t
                k_cache[:, :, ctx.start : end] = k
                v_cache[:, :, ctx.start : end] = v
                k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        out = attention(q, k, v, ctx.mask, self.scale, "reference" if ctx.attn_backend == "reference" else "sdpa")
        return self.o_proj(out.transpose(1, 2).reshape(b, t, hq * d))


class MLP(nn.Module):
    """SwiGLU MLP. With `folded` (the Triton path) its norm weight is folded into gate/up and the norm, both
    projections and SiLU*up run as one kernel; `gate_up` is then None."""

    def __init__(self, gate_up: nn.Module | None, down: nn.Module, folded: kernels.NormMLPWeights | None = None):
        super().__init__()
        self.gate_up = gate_up  # one projection producing [gate | up]
        self.down = down
        self.folded = folded
        if folded is not None:
            # Registered so param_bytes() counts it; the model is built on its device and never moved after.
            self.register_buffer("folded_gate_up", folded.gate_up, persistent=False)

    def forward(self, normed):
        gate, up = self.gate_up(normed).chunk(2, dim=-1)
        return self.down(ops.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, index: int, attn_norm, attn, mlp_norm, mlp):
        super().__init__()
        self.index = index
        self.attn_norm, self.attn = attn_norm, attn
        self.mlp_norm, self.mlp = mlp_norm, mlp
        self.ranges = NO_LAYER_RANGES  # named profiler ranges when llmdrop_rt.profiling turns them on; else no-ops

    def attn_delta(self, x, ctx: StepContext):
        """What the attention sub-block adds to the residual stream (its LLM-Drop unit: norm + attention)."""
        return self.attn(self.attn_norm(x), ctx)

    def mlp_delta(self, x):
        """What the MLP sub-block (norm + MLP) adds to the residual stream."""
        if self.mlp.folded is not None:
            return self.mlp.down(ops.norm_swiglu(x, self.mlp.folded, self.mlp_norm.eps))
        return self.mlp(self.mlp_norm(x))

    def forward(self, x, ctx: StepContext):
        """x -> the layer's output, x untouched (what scoring compares)."""
        if self.attn is not None:
            x = x + self.attn_delta(x, ctx)
        if self.mlp is not None:
            x = x + self.mlp_delta(x)
        return x

    def forward_fused(self, x, pending, ctx: StepContext):
        """The hot path. The residual stream x is updated in place, and each sub-block's output is returned as
        `pending` so that adding it is fused into the next RMSNorm (add_rms_norm_) instead of a separate pass."""
        ranges = self.ranges
        if self.attn is not None:
            with ranges.attn_norm:
                normed = add_norm_(x, pending, self.attn_norm)
            with ranges.attention:
                pending = self.attn(normed, ctx)
        if self.mlp is not None:
            if self.mlp.folded is not None:  # the norm lives inside the fused MLP kernel
                with ranges.mlp:
                    if pending is not None:
                        x += pending
                    pending = self.mlp.down(ops.norm_swiglu(x, self.mlp.folded, self.mlp_norm.eps))
            else:
                with ranges.mlp_norm:
                    normed = add_norm_(x, pending, self.mlp_norm)
                with ranges.mlp:
                    pending = self.mlp(normed)
        return pending


def add_norm_(x, pending, norm: RMSNorm):
    """norm(x + pending), with x updated in place; just norm(x) when nothing is pending."""
    if pending is None:
        return norm(x)
    return ops.add_rms_norm_(x, pending, norm.weight, norm.eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: DropPlan, embed: torch.Tensor, layers, norm, lm_head: torch.Tensor):
        super().__init__()
        self.cfg, self.plan = cfg, plan
        self.embed = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        # Tied embeddings share one tensor: no second copy of the vocabulary matrix.
        self.lm_head = self.embed.weight if lm_head is None else nn.Parameter(lm_head, requires_grad=False)
        self.register_buffer("inv_freq", cfg.rope.inverse_frequencies(cfg.head_dim), persistent=False)
        self.ranges = NO_STACK_RANGES  # see DecoderLayer.ranges

    def rope_tables(self, positions: torch.Tensor) -> ops.RopeTables:
        return rope_tables(self.inv_freq, positions)

    def context(self, positions, cache=None, start=0, key_valid=None, attn_backend="sdpa") -> StepContext:
        """Everything the layers of one step share, built once: rotary tables and the attention mask."""
        return step_context(self.cfg, self.inv_freq, positions, cache, start, key_valid, attn_backend)

    def logits(self, hidden):
        return ops.linear(self.norm(hidden), self.lm_head)

    def forward(self, tokens, positions, cache=None, start=0, key_valid=None, attn_backend="sdpa", last_only=False):
        """Logits for `tokens` [B, T] at rotary `positions` [B, T].

        With a cache, K/V are written at cache indices start..start+T-1 and attention reads 0..start+T-1;
        `key_valid` [B, >=start+T] marks padding (False) to be masked out.
        """
        return self.run(tokens, self.context(positions, cache, start, key_valid, attn_backend), last_only)

    def run(self, tokens, ctx: StepContext, last_only=False):
        """Logits for `tokens` under a prepared step context."""
        with self.ranges.embedding:
            x = self.embed(tokens)
        pending = None
        for layer in self.layers:
            pending = layer.forward_fused(x, pending, ctx)
        if last_only:
            x = x[:, -1:].contiguous()
            pending = None if pending is None else pending[:, -1:]
        with self.ranges.final_norm:
            normed = add_norm_(x, pending, self.norm)
        with self.ranges.lm_head:
            return ops.linear(normed, self.lm_head)


# ---- building from a checkpoint ------------------------------------------------------------------------------


def dense_linear(weights: list[torch.Tensor], biases: list[torch.Tensor] | None) -> nn.Linear:
    """One nn.Linear over the concatenation of several projections that read the same input (q|k|v, gate|up)."""
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=biases is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if biases is not None:
        linear.bias = nn.Parameter(torch.cat(biases) if len(biases) > 1 else biases[0], requires_grad=False)
    return linear


class ConcatProjection(nn.Module):
    """Several projections of one input whose outputs are concatenated (quantized layers that cannot be merged)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=-1)


def concat_quant_linear(layers: list[QuantLinear]) -> nn.Module:
    """One QuantLinear over q|k|v (or gate|up) by stacking output rows, when their group layout agrees."""
    if len(layers) == 1:
        return layers[0]
    first = layers[0]
    mergeable = all(l.input_perm is None and l.group_size == first.group_size and
                    (l.bias is None) == (first.bias is None) and l.scales.dtype == first.scales.dtype for l in layers)
    if not mergeable:  # act-order layers each keep their own input permutation
        return ConcatProjection(layers)
    bias = None if first.bias is None else torch.cat([l.bias for l in layers])
    return QuantLinear(torch.cat([l.qweight for l in layers]), torch.cat([l.scales for l in layers]),
                       torch.cat([l.zeros for l in layers]), first.group_size, first.in_features,
                       sum(l.out_features for l in layers), None, bias)


class ModelBuilder:
    """Reads only the tensors of kept modules, casts them once, and assembles the modules.

    `build()` makes the whole model; the scorer streams with `layer(i)`, one decoder layer at a time.
    """

    def __init__(self, cfg: ModelConfig, plan: DropPlan, reader: CheckpointReader, dtype, device):
        self.cfg, self.plan, self.reader, self.dtype, self.device = cfg, plan, reader, dtype, device
        self.qconfig = parse_quant_config(cfg.raw, getattr(reader, "folder", None))
        # Fold MLP norms into gate/up when the fused Triton kernel will run (decided once, at load time).
        self.fold_mlp_norm = ops.uses_triton(torch.device(device)) and not cfg.mlp_bias and self.qconfig is None

    def tensor(self, name, shape):
        return self.reader.get(name, shape).to(device=self.device, dtype=self.dtype)

    def projection(self, prefixes: list[str], in_features: int, out_features: list[int], bias: bool) -> nn.Module:
        quantized = [self.qconfig is not None and self.qconfig.quantizes(p) for p in prefixes]
        if any(quantized) and not all(quantized):
            raise ValueError(f"{prefixes}: quantization_config.dynamic excludes some of these projections but "
                             "not all; they share one input and are loaded as one (exclude all or none)")
        if all(quantized):
            layers = [QuantLinear.from_checkpoint(self.quant_tensor, p, in_features, o, self.qconfig, bias)
                      for p, o in zip(prefixes, out_features)]
            return concat_quant_linear(layers).to(self.device)
        weights = [self.tensor(f"{p}.weight", (o, in_features)) for p, o in zip(prefixes, out_features)]
        biases = [self.tensor(f"{p}.bias", (o,)) for p, o in zip(prefixes, out_features)] if bias else None
        return dense_linear(weights, biases)

    def quant_tensor(self, name: str) -> torch.Tensor:
        """Packed tensors as stored (QuantLinear validates and repacks them); KeyError when absent."""
        if not self.reader.has(name):
            raise KeyError(name)
        return self.reader.get(name)

    def norm(self, name):
        return RMSNorm(self.tensor(name, (self.cfg.hidden_size,)), self.cfg.rms_norm_eps)

    def layer(self, i: int) -> DecoderLayer:
        cfg, p = self.cfg, f"model.layers.{i}"
        attn_norm = attn = mlp_norm = mlp = None
        if self.plan.has_attn(i):
            h, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            qkv = self.projection(
                [f"{p}.self_attn.{n}_proj" for n in "qkv"], h, [q_out, kv_out, kv_out], cfg.attention_bias
            )
            o_proj = self.projection([f"{p}.self_attn.o_proj"], q_out, [h], cfg.attention_bias)
            attn_norm, attn = self.norm(f"{p}.input_layernorm.weight"), Attention(cfg, i, qkv, o_proj)
        if self.plan.has_mlp(i):
            h, inter = cfg.hidden_size, cfg.intermediate_size
            gate_up = self.projection([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], h, [inter, inter], cfg.mlp_bias)
            down = self.projection([f"{p}.mlp.down_proj"], inter, [h], cfg.mlp_bias)
            mlp_norm = self.norm(f"{p}.post_attention_layernorm.weight")
            if self.fold_mlp_norm:
                gate, up = gate_up.weight.chunk(2)
                mlp = MLP(None, down, kernels.prepare_norm_mlp(mlp_norm.weight, gate, up))
            else:
                mlp = MLP(gate_up, down)
        return DecoderLayer(i, attn_norm, attn, mlp_norm, mlp)

    def embedding(self) -> torch.Tensor:
        return self.tensor("model.embed_tokens.weight", (self.cfg.vocab_size, self.cfg.hidden_size))

    def final_norm(self) -> RMSNorm:
        return self.norm("model.norm.weight")

    def lm_head(self) -> torch.Tensor | None:
        """The output projection, or None when tied to the embedding."""
        if self.cfg.tie_word_embeddings:
            return None
        return self.tensor("lm_head.weight", (self.cfg.vocab_size, self.cfg.hidden_size))

    def build(self) -> Transformer:
        layers = [self.layer(i) for i in range(self.cfg.num_layers)]
        return Transformer(self.cfg, self.plan, self.embedding(), layers, self.final_norm(), self.lm_head()).eval()


def build_transformer(cfg: ModelConfig, plan: DropPlan, reader: CheckpointReader, dtype, device) -> Transformer:
    return ModelBuilder(cfg, plan, reader, dtype, device).build()
