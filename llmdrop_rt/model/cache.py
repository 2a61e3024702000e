"""Static, preallocated KV cache with one slot per *kept* attention layer.

A layer whose attention is dropped has no slot at all (LLM-Drop's `kv_cache_idx`): the cache's size is
exactly (kept attention layers / all layers) of a full model's. Layout per slot: [B, Hkv, S, D], in the cache's own
dtype (`load(kv_cache=...)`), which may be narrower than the activations': keys and values are rounded to it once,
when written, and every later read sees the rounded values.
"""
from __future__ import annotations

import copy

import torch

from ..config import DropPlan, ModelConfig

# load(kv_cache=...)'s names; "auto" keeps the activations' dtype.
KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_kv_dtype(kv_cache: str, activations: torch.dtype) -> torch.dtype:
    if kv_cache == "auto":
        return activations
    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {['auto', *KV_CACHE_DTYPES]}")
    return KV_CACHE_DTYPES[kv_cache]


class KVCache:
    def __init__(self, cfg: ModelConfig, plan: DropPlan, batch_size: int, max_len: int, dtype, device):
        self.max_len = max_len
        self.batch_size = batch_size
        self.slot_of = self.slots(plan)
        shape = (len(self.slot_of), batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def slots(plan: DropPlan) -> dict[int, int]:
        """Layer index -> its slot, for the layers whose attention is kept."""
        return {layer: slot for slot, layer in enumerate(plan.kept_attn_layers)}

    def first_rows(self, rows: int) -> KVCache:
        """A view of rows 0..rows-1 sharing this cache's memory (a batch running on part of a pool); each
        layer's slot stays contiguous."""
        view = copy.copy(self)
        view.batch_size, view.k, view.v = rows, self.k[:, :rows], self.v[:, :rows]
        return view

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = self.slot_of[layer]
        return self.k[slot], self.v[slot]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor):
        """Store k, v [B, Hkv, T, D] at cache indices start..start+T-1 and return the keys and values to attend over.

        An int `start` returns the filled prefix 0..start+T-1. A 0-dim tensor `start` (the static-shape step, which
        a CUDA graph can capture) writes by `index_copy_` and returns the whole cache: the step's mask hides the
        positions not yet written.
        """
        k_cache, v_cache = self.layer(layer)
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        if isinstance(start, torch.Tensor):
            index = start + torch.arange(k.shape[2], device=k.device)
            k_cache.index_copy_(2, index, k)
            v_cache.index_copy_(2, index, v)
            return k_cache, v_cache
        end = start + k.shape[2]
        k_cache[:, :, start:end] = k
        v_cache[:, :, start:end] = v
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def sequence_major(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's slots as [B, S, Hkv, D] views, the layout flash-attn reads and appends to in place."""
        k_cache, v_cache = self.layer(layer)
        return k_cache.transpose(1, 2), v_cache.transpose(1, 2)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(cfg: ModelConfig, plan: DropPlan, batch_size: int, max_len: int, dtype) -> int:
        """What a cache of this size would take, without allocating it."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * len(plan.kept_attn_layers) * batch_size * cfg.num_kv_heads * max_len * cfg.head_dim * element
