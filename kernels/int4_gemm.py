"""4-bit-weight GEMM (Triton), dequantizing in registers and multiplying on tensor cores: `QuantLinear`'s prefill.

Weights come in `QuantLinear`'s kernel layout (llmdrop_rt/quant.py), the same for AWQ and GPTQ:

* ``qweight`` int32 [N, K/8]: word w of row n holds q[n, 8w + j] in bits 4j..4j+3 (low nibble first);
* ``scales``, ``zeros`` [N, groups] in the activation's 16-bit (or 32-bit) dtype; column k is in group
  k // group_size (GPTQ act-order inputs arrive already permuted into that order).

Each program owns one [BLOCK_M, BLOCK_N] output tile. Per K step it loads the packed words behind a
[BLOCK_K, BLOCK_N] weight tile, unpacks them, computes ``(q - zero) * scale`` in fp32 (exact for fp16 scales) and
rounds once to the activation dtype, then ``tl.dot`` accumulates in fp32 (tensor cores for fp16/bf16). The
dequantized weights exist only in registers: a GEMM reads 4 bits per weight per row tile instead of 16.
"""
from __future__ import annotations

import torch

from ._triton import HAVE_TRITON, dot_settings, tl, triton

NIBBLES = 8  # 4-bit values per int32 word


def _check_args(x, qweight, scales, zeros, group_size) -> tuple[int, int, int]:
    """Validate a call and return (rows, in_features, out_features)."""
    if x.dim() != 2:
        raise ValueError(f"int4_gemm: x must be [rows, in_features], got shape {tuple(x.shape)}")
    rows, in_features = x.shape
    out_features = qweight.shape[0]
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (out_features, in_features // NIBBLES) \
            or in_features % NIBBLES:
        raise ValueError(f"int4_gemm: qweight must be int32 [out, {in_features}/8] for in_features={in_features} "
                         f"(a multiple of 8), got {qweight.dtype} {tuple(qweight.shape)}")
    if group_size < NIBBLES or group_size % NIBBLES:
        raise ValueError(f"int4_gemm: group_size must be a positive multiple of 8, got {group_size}")
    groups = -(-in_features // group_size)
    for name, tensor in (("scales", scales), ("zeros", zeros)):
        if tuple(tensor.shape) != (out_features, groups):
            raise ValueError(f"int4_gemm: {name} must be [{out_features}, {groups}] (out, groups), "
                             f"got {tuple(tensor.shape)}")
    for name, tensor in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if tensor.device != x.device:
            raise ValueError(f"int4_gemm: {name} is on {tensor.device} but x is on {x.device}")
    return rows, in_features, out_features


def int4_gemm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> torch.Tensor:
    """Plain torch: dequantize the whole weight in fp32, round it to ``x.dtype``, then ``x @ W.T``."""
    _, in_features, _ = _check_args(x, qweight, scales, zeros, group_size)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    q = ((qweight.unsqueeze(-1) >> shifts) & 0xF).flatten(1).to(torch.float32)  # [N, K]
    group = torch.arange(in_features, device=x.device) // group_size
    weight = (q - zeros[:, group].to(torch.float32)) * scales[:, group].to(torch.float32)
    return x @ weight.to(x.dtype).t()


def _configs() -> list:
    if not torch.cuda.is_available():  # the interpreter: few, large programs run fastest
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
        (128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4),
        (64, 64, 64, 4, 4), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 3, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


if HAVE_TRITON:

    @triton.autotune(configs=_configs(), key=["in_features", "out_features", "rows_bucket"])
    @triton.jit
    def _int4_gemm_kernel(x_ptr, x_row_stride, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, rows, in_features,
                          out_features, groups, group_size, rows_bucket, DOT_PRECISION: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # `rows_bucket` only keys the autotuner (rows rounded up to a power of two).
        row_index = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_index = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = row_index < rows
        col_mask = col_index < out_features
        cols = col_index.to(tl.int64)[None, :]
        x_rows = x_ptr + row_index.to(tl.int64)[:, None] * x_row_stride
        words_per_row = in_features // 8
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, in_features, BLOCK_K):
            k_index = start + tl.arange(0, BLOCK_K)
            k_mask = k_index < in_features
            x = tl.load(x_rows + k_index[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
            # [BLOCK_K, BLOCK_N] tile: each packed word is loaded for its 8 columns k and shifted to its nibble.
            words = tl.load(qweight_ptr + cols * words_per_row + (k_index // 8)[:, None], mask=w_mask, other=0)
            q = (words >> ((k_index % 8) * 4)[:, None]) & 0xF
            group = cols * groups + (k_index // group_size)[:, None]
            scale = tl.load(scales_ptr + group, mask=w_mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group, mask=w_mask, other=0.0).to(tl.float32)
            w = ((q.to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        out_ptrs = out_ptr + row_index.to(tl.int64)[:, None] * out_features + col_index[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])



def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """``x @ W.T`` for x [rows, in_features] (fp32/fp16/bf16) and 4-bit W in the layout above -> [rows, out]."""
    if not HAVE_TRITON:
        raise RuntimeError("int4_gemm needs Triton; use int4_gemm_reference")
    rows, in_features, out_features = _check_args(x, qweight, scales, zeros, group_size)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"int4_gemm: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    precision, dot_dtype = dot_settings(x)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))
    _int4_gemm_kernel[grid](x, x.stride(0), qweight.contiguous(), scales.contiguous(), zeros.contiguous(), out,
                            rows, in_features, out_features, scales.shape[1], group_size,
                            triton.next_power_of_2(rows), DOT_PRECISION=precision, DOT_DTYPE=dot_dtype)
    return out
