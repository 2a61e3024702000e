"""Rotary position embedding applied in place to q and k (Triton), with its plain-torch reference.

HF Llama's rotate-half convention, per head, with ``half = D // 2``:

    x1, x2 = x[..., :half], x[..., half:]
    x      = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)

q is ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]``, the layout a projection output has after its
``view``; both may be strided views into one fused qkv buffer. ``cos``/``sin`` are ``[B, T, D//2]``
fp32, already gathered at each row's position (any strides, so an ``expand``-ed table works).
The rotation is computed in fp32 and rounded once to the I/O dtype.

One program handles one (batch, position) row: it loads cos/sin once and rotates every q and k
head at that row, so the launch is a single kernel whatever the head counts.
"""
from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton


def _check_rope_args(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope_: q and k must be [B, T, heads, D], got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    batch, length, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != length or k.shape[3] != head_dim:
        raise ValueError(f"apply_rope_: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
                         f"in batch, length or head dim")
    if head_dim % 2:
        raise ValueError(f"apply_rope_: head dim must be even, got {head_dim}")
    if k.dtype != q.dtype:
        raise ValueError(f"apply_rope_: k dtype {k.dtype} differs from q dtype {q.dtype}")
    expected = (batch, length, head_dim // 2)
    for name, table in (("cos", cos), ("sin", sin)):
        if tuple(table.shape) != expected:
            raise ValueError(f"apply_rope_: {name} must have shape {expected}, got {tuple(table.shape)}")
        if table.dtype != torch.float32:
            raise ValueError(f"apply_rope_: {name} must be float32, got {table.dtype}")
    for name, tensor in (("k", k), ("cos", cos), ("sin", sin)):
        if tensor.device != q.device:
            raise ValueError(f"apply_rope_: {name} is on {tensor.device} but q is on {q.device}")


def _rotate_half_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    half = x.shape[-1] // 2
    compute_dtype = torch.promote_types(x.dtype, cos.dtype)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    first = x[..., :half].to(compute_dtype)
    second = x[..., half:].to(compute_dtype)
    # Both halves are computed before either is written back: `first` may alias x when no cast was needed.
    rotated_first = first * cos - second * sin
    rotated_second = second * cos + first * sin
    x[..., :half].copy_(rotated_first)
    x[..., half:].copy_(rotated_second)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch in-place rotary embedding (the runtime's non-Triton path); returns ``(q, k)``."""
    _check_rope_args(q, k, cos, sin)
    _rotate_half_(q, cos, sin)
    _rotate_half_(k, cos, sin)
    return q, k


if HAVE_TRITON:

    @triton.jit
    def _rotate_heads(x_ptr, stride_h, stride_d, heads, half, cos, sin, dims, dim_mask,
                      BLOCK_HEADS: tl.constexpr):
        head_index = tl.arange(0, BLOCK_HEADS)
        mask = (head_index[:, None] < heads) & dim_mask[None, :]
        first_ptrs = x_ptr + head_index[:, None] * stride_h + dims[None, :] * stride_d
        second_ptrs = first_ptrs + half * stride_d
        first = tl.load(first_ptrs, mask=mask, other=0.0)
        second = tl.load(second_ptrs, mask=mask, other=0.0)
        first32 = first.to(tl.float32)
        second32 = second.to(tl.float32)
        tl.store(first_ptrs, (first32 * cos - second32 * sin).to(first.dtype), mask=mask)
        tl.store(second_ptrs, (second32 * cos + first32 * sin).to(first.dtype), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, q_stride_b, q_stride_t, q_stride_h, q_stride_d,
                     k_ptr, k_stride_b, k_stride_t, k_stride_h, k_stride_d,
                     cos_ptr, cos_stride_b, cos_stride_t, cos_stride_d,
                     sin_ptr, sin_stride_b, sin_stride_t, sin_stride_d,
                     length, q_heads, k_heads, half,
                     BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
        row = tl.program_id(0)
        batch = (row // length).to(tl.int64)
        position = (row % length).to(tl.int64)
        dims = tl.arange(0, BLOCK_HALF)
        dim_mask = dims < half
        cos_offsets = batch * cos_stride_b + position * cos_stride_t + dims * cos_stride_d
        sin_offsets = batch * sin_stride_b + position * sin_stride_t + dims * sin_stride_d
        cos = tl.load(cos_ptr + cos_offsets, mask=dim_mask, other=0.0)[None, :]
        sin = tl.load(sin_ptr + sin_offsets, mask=dim_mask, other=0.0)[None, :]
        _rotate_heads(q_ptr + batch * q_stride_b + position * q_stride_t, q_stride_h, q_stride_d,
                      q_heads, half, cos, sin, dims, dim_mask, BLOCK_Q_HEADS)
        _rotate_heads(k_ptr + batch * k_stride_b + position * k_stride_t, k_stride_h, k_stride_d,
                      k_heads, half, cos, sin, dims, dim_mask, BLOCK_K_HEADS)


def apply_rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``[B, T, Hq, D]`` and k ``[B, T, Hkv, D]`` in place (any strides); returns ``(q, k)``."""
    if not HAVE_TRITON:
        raise RuntimeError("apply_rope_: Triton is not installed; use apply_rope_reference instead")
    _check_rope_args(q, k, cos, sin)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"apply_rope_: supported dtypes are float32, float16 and bfloat16, got {q.dtype}")
    batch, length, q_heads, head_dim = q.shape
    k_heads = k.shape[2]
    rows = batch * length
    if rows == 0:
        return q, k
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_q_heads = triton.next_power_of_2(q_heads)
    num_warps = 4 if block_q_heads * block_half <= 2048 else 8
    _rope_kernel[(rows,)](
        q, *q.stride(), k, *k.stride(), cos, *cos.stride(), sin, *sin.stride(), length, q_heads, k_heads, half,
        BLOCK_Q_HEADS=block_q_heads, BLOCK_K_HEADS=triton.next_power_of_2(k_heads), BLOCK_HALF=block_half,
        num_warps=num_warps)
    return q, k
