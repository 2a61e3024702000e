"""RMSNorm and fused residual-add + RMSNorm (Triton), with their plain-torch references.

Semantics follow Hugging Face ``LlamaRMSNorm`` exactly, including where it rounds:

    normed = (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)
    y      = weight * normed            # one more rounding to x.dtype

``add_rms_norm_`` first does ``residual += delta`` in place (one rounding to the residual's dtype,
as torch's ``+=`` does), then normalises the updated residual.

The kernels run one program per row with the whole row in registers, so a row is read once and
written once; the sum of squares is accumulated in fp32. Normalisation is a bandwidth-bound row
operation, so a block-size heuristic for the warp count is all the tuning it needs (autotuning the
in-place variant would also have to snapshot and restore the residual between trial runs).
"""
from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, tl, triton

# A whole row lives in one program's registers; past this a two-pass kernel would be needed.
MAX_HIDDEN = 65536


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor, name: str = "x") -> int:
    """Validate a normalisation call and return the hidden size."""
    if x.dim() < 1:
        raise ValueError(f"rms_norm: {name} must have at least one dimension, got a scalar")
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"rms_norm: weight must have shape ({hidden},) to match {name}.shape[-1], "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} differs from {name} dtype {x.dtype}; "
                         f"cast the weight once at load time")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device} but {name} is on {x.device}")
    return hidden


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm with LlamaRMSNorm's cast order (the runtime's non-Triton path).

    Accumulates in at least fp32 (fp64 inputs stay fp64) and returns ``x.dtype``.
    """
    _check_norm_args(x, weight)
    accumulate = x.to(torch.promote_types(x.dtype, torch.float32))
    variance = accumulate.pow(2).mean(-1, keepdim=True)
    normed = (accumulate * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed


def add_rms_norm_reference(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """Plain-torch ``residual += delta`` (in place) followed by RMSNorm of the updated residual."""
    _check_residual_args(residual, delta)
    residual += delta
    return rms_norm_reference(residual, weight, eps)


def _check_residual_args(residual: torch.Tensor, delta: torch.Tensor) -> None:
    if delta.shape != residual.shape:
        raise ValueError(f"add_rms_norm_: delta shape {tuple(delta.shape)} differs from residual shape "
                         f"{tuple(residual.shape)}")
    if delta.dtype != residual.dtype:
        raise ValueError(f"add_rms_norm_: delta dtype {delta.dtype} differs from residual dtype {residual.dtype}")
    if delta.device != residual.device:
        raise ValueError(f"add_rms_norm_: delta is on {delta.device} but residual is on {residual.device}")


def _require_triton(x: torch.Tensor, op: str) -> None:
    if not HAVE_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed; use {op}_reference instead")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: supported dtypes are float32, float16 and bfloat16, got {x.dtype}")


def _rows_view(x: torch.Tensor, hidden: int, name: str, op: str, writable: bool) -> torch.Tensor:
    """Return ``x`` as [rows, hidden] with unit stride along hidden.

    A tensor the kernel writes into must be viewable as rows without a copy, or the caller would
    never see the write.
    """
    if writable:
        if x.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride along its last dimension to be updated "
                             f"in place, got strides {tuple(x.stride())}")
        try:
            return x.view(-1, hidden)
        except RuntimeError as error:
            raise ValueError(f"{op}: {name} with shape {tuple(x.shape)} and strides {tuple(x.stride())} "
                             f"cannot be viewed as rows for an in-place update") from error
    rows = x.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _output_buffer(out: torch.Tensor | None, like: torch.Tensor, op: str) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{op}: out must be {tuple(like.shape)} {like.dtype} on {like.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous, got strides {tuple(out.stride())}")
    return out


def _launch_shape(hidden: int, op: str) -> tuple[int, int]:
    if hidden > MAX_HIDDEN:
        raise ValueError(f"{op}: hidden size {hidden} exceeds the supported maximum {MAX_HIDDEN}")
    block = triton.next_power_of_2(hidden)
    # Roughly 8-16 elements per thread keeps the row in registers without spilling.
    num_warps = min(max(block // 512, 1), 16)
    return block, num_warps


if HAVE_TRITON:

    @triton.jit
    def _rms_norm_kernel(x_ptr, x_row_stride, weight_ptr, out_ptr, hidden, eps,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        x32 = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
        # Round the normalised row to the I/O dtype before the weight product, as LlamaRMSNorm does.
        normed = (x32 * inv_rms).to(x.dtype).to(tl.float32)
        y = normed * weight.to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, y.to(x.dtype), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(residual_ptr, residual_row_stride, delta_ptr, delta_row_stride,
                             weight_ptr, out_ptr, hidden, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        delta = tl.load(delta_ptr + row * delta_row_stride + cols, mask=mask, other=0.0)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
        # `residual += delta` rounds the sum to the residual dtype; normalise that rounded value.
        updated = (residual.to(tl.float32) + delta.to(tl.float32)).to(residual.dtype)
        tl.store(residual_ptr + row * residual_row_stride + cols, updated, mask=mask)
        x32 = updated.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
        normed = (x32 * inv_rms).to(residual.dtype).to(tl.float32)
        y = normed * weight.to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, y.to(residual.dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of the last dimension of ``x`` (any leading shape), returned in ``x.dtype``.

    ``out``, if given, must be a contiguous tensor shaped like ``x``; it is filled and returned.
    """
    _require_triton(x, "rms_norm")
    hidden = _check_norm_args(x, weight)
    out = _output_buffer(out, x, "rms_norm")
    if x.numel() == 0:
        return out
    rows = _rows_view(x, hidden, "x", "rms_norm", writable=False)
    block, num_warps = _launch_shape(hidden, "rms_norm")
    _rms_norm_kernel[(rows.shape[0],)](rows, rows.stride(0), weight.contiguous(), out, hidden, float(eps),
                                       BLOCK=block, num_warps=num_warps)
    return out


def add_rms_norm_(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``residual += delta`` in place, then return RMSNorm(residual) * weight in one pass.

    ``residual`` must be viewable as rows with unit stride along the hidden dimension (the update
    is written straight into it). ``out``, if given, must be contiguous and shaped like ``residual``.
    """
    _require_triton(residual, "add_rms_norm_")
    hidden = _check_norm_args(residual, weight, name="residual")
    _check_residual_args(residual, delta)
    out = _output_buffer(out, residual, "add_rms_norm_")
    if residual.numel() == 0:
        return out
    residual_rows = _rows_view(residual, hidden, "residual", "add_rms_norm_", writable=True)
    delta_rows = _rows_view(delta, hidden, "delta", "add_rms_norm_", writable=False)
    block, num_warps = _launch_shape(hidden, "add_rms_norm_")
    _add_rms_norm_kernel[(residual_rows.shape[0],)](
        residual_rows, residual_rows.stride(0), delta_rows, delta_rows.stride(0), weight.contiguous(), out,
        hidden, float(eps), BLOCK=block, num_warps=num_warps)
    return out
