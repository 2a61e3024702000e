"""Attention backends behind one function, and the one mask every layer of a step shares.

Backends:
- `sdpa`: PyTorch scaled_dot_product_attention (FlashAttention / memory-efficient kernels on CUDA, a fused CPU
  kernel on CPU); GQA through `enable_gqa`, so K/V heads are never repeated in memory.
- `reference`: explicit fp32 softmax(QK^T)V; slow and simple, for debugging and tests. Also the path of every
  layer with attention-logit soft-capping (Gemma2), which sdpa and its kernels cannot express.
- `flash`: the `flash-attn` package's `flash_attn_with_kvcache` for cached steps of un-padded batches (it appends
  K/V to the cache itself and handles GQA and the sliding window natively); other steps use `sdpa`. Chosen by
  default on CUDA when flash-attn is importable. (flash-attn ships only as an sdist that compiles for hours, so it
  is optional.)

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask None or bool [B, 1, T, S] (True = may attend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "reference", "flash")

try:
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


def default_backend(device: torch.device) -> str:
    return "flash" if device.type == "cuda" and flash_attn_with_kvcache is not None else "sdpa"


def build_mask(
    q_len: int,
    start: int,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Boolean mask for queries at cache indices start..start+q_len-1 over keys 0..start+q_len-1.

    Causal, minus padded keys (`key_valid` [B, >=S], False = padding) and keys outside the sliding window
    (visible iff query_index - window < key_index). Returns None when plain causal attention over the whole
    prefix is exact, so the common un-padded case runs on the backends' fastest path.
    """
    total = start + q_len
    window_bites = sliding_window is not None and total > sliding_window
    if key_valid is None and not window_bites and (q_len == 1 or start == 0):
        return None
    q_idx = torch.arange(start, total, device=device)[:, None]
    k_idx = torch.arange(total, device=device)[None, :]
    allowed = k_idx <= q_idx
    if window_bites:
        allowed = allowed & (k_idx > q_idx - sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, S]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :total]
        # A query sitting on padding would see no key at all; letting it see itself keeps softmax finite
        # (its output is never used, but a NaN in the cache would poison real tokens through 0 * NaN).
        allowed = allowed | (q_idx == k_idx)[None, None]
    return allowed


def attention(q, k, v, mask: torch.Tensor | None, scale: float, backend: str = "sdpa",
              softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v; causal when mask is None and q and k have the same length. With `softcap`
    the scores are soft-capped first (softcap * tanh(scores / softcap)), on the explicit path."""
    causal = mask is None and q.shape[-2] == k.shape[-2] and q.shape[-2] > 1
    if softcap is not None:
        return reference_attention(q, k, v, mask, scale, causal, softcap)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    if backend == "reference":
        return reference_attention(q, k, v, mask, scale, causal)
    raise ValueError(f"attention backend {backend!r} is not available here; choose from {BACKENDS}")


def reference_attention(q, k, v, mask, scale, causal=False, softcap=None):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)
