"""Fused RMSNorm + gate/up projection + SwiGLU (Triton), with its plain-torch reference.

For a Llama MLP block the activation fed to the down projection is

    h   = rms_norm(x) * norm_weight
    act = silu(h @ gate.T) * (h @ up.T)

RMSNorm scales each row by one number, 1/rms(x), and each column by ``norm_weight``. The column
scale is folded into the gate/up weights once (``prepare_norm_mlp``); the row scale commutes with
the GEMM, so the kernel multiplies raw ``x`` by the folded weights and applies 1/rms in the
epilogue. The sum of squares for 1/rms is accumulated from the very ``x`` tiles the GEMM loads,
so the norm costs no extra pass, and gate/up never leave registers: only ``act`` is written.

Two kernels, picked by row count:
  * decode (up to ``DECODE_MAX_ROWS`` rows): a GEMV-style split over the output dimension, each
    program reading a slab of gate and up rows once for all input rows;
  * prefill: tiled ``tl.dot`` with a gate and an up accumulator per output tile.

Both are autotuned on a GPU; under Triton's CPU interpreter each uses a single config.
The down projection is a plain matmul and is not here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._triton import HAVE_TRITON, dot_settings, tl, triton

# Up to this many rows the weight read dominates and the GEMV kernel is used.
DECODE_MAX_ROWS = 16


@dataclass(frozen=True)
class NormMLPWeights:
    """Gate and up weights with the RMSNorm weight folded in, packed as one [2, I, H] tensor.

    ``gate_up[0]`` is ``gate * norm_weight`` and ``gate_up[1]`` is ``up * norm_weight`` (scaled
    along the hidden dimension), in the original weight dtype.
    """

    gate_up: torch.Tensor

    def __post_init__(self):
        if self.gate_up.dim() != 3 or self.gate_up.shape[0] != 2 or not self.gate_up.is_contiguous():
            raise ValueError(f"NormMLPWeights: gate_up must be a contiguous [2, intermediate, hidden] tensor, got "
                             f"shape {tuple(self.gate_up.shape)} with strides {tuple(self.gate_up.stride())}")

    @property
    def hidden_size(self) -> int:
        return self.gate_up.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.gate_up.shape[1]


def prepare_norm_mlp(norm_weight: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> NormMLPWeights:
    """Fold the RMSNorm weight ``[H]`` into gate/up weights ``[I, H]`` (done once, at load time).

    The product is formed in at least fp32 and rounded once to the weights' dtype.
    """
    if gate_weight.dim() != 2:
        raise ValueError("prepare_norm_mlp: gate_weight must be [intermediate, hidden], "
                         f"got {tuple(gate_weight.shape)}")
    intermediate, hidden = gate_weight.shape
    if up_weight.shape != gate_weight.shape:
        raise ValueError(f"prepare_norm_mlp: up_weight shape {tuple(up_weight.shape)} differs from gate_weight "
                         f"shape {tuple(gate_weight.shape)}")
    if norm_weight.shape != (hidden,):
        raise ValueError(f"prepare_norm_mlp: norm_weight must have shape ({hidden},), got {tuple(norm_weight.shape)}")
    for name, tensor in (("up_weight", up_weight), ("norm_weight", norm_weight)):
        if tensor.dtype != gate_weight.dtype:
            raise ValueError(f"prepare_norm_mlp: {name} dtype {tensor.dtype} differs from gate_weight dtype "
                             f"{gate_weight.dtype}")
        if tensor.device != gate_weight.device:
            raise ValueError(f"prepare_norm_mlp: {name} is on {tensor.device} but gate_weight is on "
                             f"{gate_weight.device}")
    compute_dtype = torch.promote_types(gate_weight.dtype, torch.float32)
    scale = norm_weight.to(compute_dtype)
    gate_up = torch.stack((gate_weight.to(compute_dtype) * scale, up_weight.to(compute_dtype) * scale))
    return NormMLPWeights(gate_up=gate_up.to(gate_weight.dtype).contiguous())


def _check_call(x: torch.Tensor, prepared: NormMLPWeights, op: str) -> None:
    if x.dim() < 1 or x.shape[-1] != prepared.hidden_size:
        raise ValueError(f"{op}: x must end in the hidden size {prepared.hidden_size}, got shape {tuple(x.shape)}")
    if x.dtype != prepared.gate_up.dtype:
        raise ValueError(f"{op}: x dtype {x.dtype} differs from the prepared weight dtype {prepared.gate_up.dtype}")
    if x.device != prepared.gate_up.device:
        raise ValueError(f"{op}: x is on {x.device} but the prepared weights are on {prepared.gate_up.device}")


def norm_swiglu_reference(x: torch.Tensor, prepared: NormMLPWeights, eps: float) -> torch.Tensor:
    """Plain-torch ``silu(h @ gate.T) * (h @ up.T)`` with ``h = rms_norm(x) * norm_weight`` (non-Triton path).

    The norm follows LlamaRMSNorm (accumulate in at least fp32, round the normalised rows to
    ``x.dtype``); the GEMM runs in ``x.dtype``. Returns ``[..., I]`` in ``x.dtype``.
    """
    _check_call(x, prepared, "norm_swiglu_reference")
    accumulate = x.to(torch.promote_types(x.dtype, torch.float32))
    inv_rms = torch.rsqrt(accumulate.pow(2).mean(-1, keepdim=True) + eps)
    normed = (accumulate * inv_rms).to(x.dtype)
    intermediate, hidden = prepared.intermediate_size, prepared.hidden_size
    gate, up = (normed @ prepared.gate_up.view(2 * intermediate, hidden).t()).split(intermediate, dim=-1)
    return F.silu(gate) * up


def _decode_configs(block_m: int) -> list:
    """GEMV configs sized so the two [rows, BLOCK_N, BLOCK_K] accumulators stay in registers."""
    if not torch.cuda.is_available():  # the interpreter: few, large programs run fastest
        return [triton.Config({"BLOCK_N": 128, "BLOCK_K": 256})]
    configs = []
    # (fp32 elements per thread in each accumulator, warps): larger budgets need more warps.
    for elements_per_thread, num_warps in ((16, 4), (32, 4), (32, 8), (64, 8)):
        for block_n in (16, 32, 64):
            block_k = elements_per_thread * 32 * num_warps // (block_m * block_n)
            if 32 <= block_k <= 512:  # below 32 a weight row segment is too short to load well
                configs.append(triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps))
    return configs


def _prefill_configs() -> list:
    if not torch.cuda.is_available():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 2})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); two fp32 accumulators per tile
        (128, 64, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 32, 4, 8), (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 5, 4),
        (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),  # short prompts: more column tiles in flight
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


if HAVE_TRITON:

    @triton.jit
    def _norm_swiglu_gemv_kernel(x_ptr, x_row_stride, weight_ptr, up_offset, out_ptr, rows, hidden, intermediate,
                                 eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        row_index = tl.arange(0, BLOCK_M)
        row_mask = row_index < rows
        out_index = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_mask = out_index < intermediate
        gate_rows = weight_ptr + out_index.to(tl.int64)[:, None] * hidden
        up_rows = gate_rows + up_offset
        x_rows = x_ptr + row_index.to(tl.int64)[:, None] * x_row_stride
        # Products accumulate elementwise and are reduced over K once, after the loop.
        gate_partial = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        up_partial = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for start in range(0, hidden, BLOCK_K):
            k_index = start + tl.arange(0, BLOCK_K)
            k_mask = k_index < hidden
            x = tl.load(x_rows + k_index[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            x = x.to(tl.float32)
            weight_mask = out_mask[:, None] & k_mask[None, :]
            gate_w = tl.load(gate_rows + k_index[None, :], mask=weight_mask, other=0.0).to(tl.float32)
            up_w = tl.load(up_rows + k_index[None, :], mask=weight_mask, other=0.0).to(tl.float32)
            squares += x * x
            gate_partial += x[:, None, :] * gate_w[None, :, :]
            up_partial += x[:, None, :] * up_w[None, :, :]
        inv_rms = tl.rsqrt(tl.sum(squares, axis=1) / hidden + eps)[:, None]
        gate = tl.sum(gate_partial, axis=2) * inv_rms
        up = tl.sum(up_partial, axis=2) * inv_rms
        act = gate * tl.sigmoid(gate) * up
        out_ptrs = out_ptr + row_index.to(tl.int64)[:, None] * intermediate + out_index[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & out_mask[None, :])

    @triton.autotune(configs=_prefill_configs(), key=["hidden", "intermediate", "rows_bucket"])
    @triton.jit
    def _norm_swiglu_tiled_kernel(x_ptr, x_row_stride, weight_ptr, up_offset, out_ptr, rows, hidden, intermediate,
                                  rows_bucket, eps, DOT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr):
        # `rows_bucket` only keys the autotuner (rows rounded to a power of two), so a new prompt
        # length does not trigger a new tuning run.
        # Grouped tile order: GROUP_M row tiles sweep the output columns together, reusing weight
        # tiles from L2.
        pid = tl.program_id(0)
        row_tiles = tl.cdiv(rows, BLOCK_M)
        col_tiles = tl.cdiv(intermediate, BLOCK_N)
        tiles_per_group = GROUP_M * col_tiles
        first_row_tile = (pid // tiles_per_group) * GROUP_M
        group_rows = min(row_tiles - first_row_tile, GROUP_M)
        row_tile = first_row_tile + (pid % tiles_per_group) % group_rows
        col_tile = (pid % tiles_per_group) // group_rows

        row_index = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        col_index = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/columns wrap to valid ones: loads need no mask there, stores are masked.
        safe_rows = (row_index % rows).to(tl.int64)
        safe_cols = (col_index % intermediate).to(tl.int64)
        k_index = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + safe_rows[:, None] * x_row_stride + k_index[None, :]
        gate_ptrs = weight_ptr + safe_cols[None, :] * hidden + k_index[:, None]  # [BLOCK_K, BLOCK_N] = gate.T tile

        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # reduced over K after the loop
        for start in range(0, hidden, BLOCK_K):
            k_mask = k_index < hidden - start
            x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            gate_w = tl.load(gate_ptrs, mask=k_mask[:, None], other=0.0)
            up_w = tl.load(gate_ptrs + up_offset, mask=k_mask[:, None], other=0.0)
            x32 = x.to(tl.float32)
            squares += x32 * x32
            x = x.to(DOT_DTYPE)
            gate = tl.dot(x, gate_w.to(DOT_DTYPE), gate, input_precision=DOT_PRECISION)
            up = tl.dot(x, up_w.to(DOT_DTYPE), up, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K

        inv_rms = tl.rsqrt(tl.sum(squares, axis=1) / hidden + eps)[:, None]
        gate = gate * inv_rms
        act = gate * tl.sigmoid(gate) * (up * inv_rms)
        out_ptrs = out_ptr + row_index.to(tl.int64)[:, None] * intermediate + col_index[None, :]
        out_mask = (row_index < rows)[:, None] & (col_index < intermediate)[None, :]
        tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=out_mask)

    # One autotuner per row bucket: the GEMV's register budget depends on the row count.
    _gemv_kernels = {
        block_m: triton.autotune(configs=_decode_configs(block_m), key=["hidden", "intermediate"])(
            _norm_swiglu_gemv_kernel)
        for block_m in (1, 2, 4, 8, 16)
    }


def norm_swiglu(x: torch.Tensor, prepared: NormMLPWeights, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(h @ gate.T) * (h @ up.T)`` with ``h = rms_norm(x) * norm_weight``, fused; returns ``[..., I]``.

    ``x`` is ``[..., H]`` in the prepared weights' dtype (fp32, fp16 or bf16); accumulation is fp32
    (true fp32, not TF32, for fp32 inputs). ``out``, if given, must be a contiguous ``[..., I]``
    tensor of ``x.dtype``; it is filled and returned.
    """
    if not HAVE_TRITON:
        raise RuntimeError("norm_swiglu: Triton is not installed; use norm_swiglu_reference instead")
    _check_call(x, prepared, "norm_swiglu")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"norm_swiglu: supported dtypes are float32, float16 and bfloat16, got {x.dtype}")
    hidden, intermediate = prepared.hidden_size, prepared.intermediate_size
    out_shape = x.shape[:-1] + (intermediate,)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif out.shape != out_shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"norm_swiglu: out must be a contiguous {tuple(out_shape)} {x.dtype} tensor on {x.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} with strides {tuple(out.stride())}")
    x_rows = x.reshape(-1, hidden)
    if x_rows.stride(-1) != 1:
        x_rows = x_rows.contiguous()
    rows = x_rows.shape[0]
    if rows == 0:
        return out
    weight = prepared.gate_up
    up_offset = weight.stride(0)  # elements from a gate row to the matching up row
    if rows <= DECODE_MAX_ROWS:
        block_m = triton.next_power_of_2(rows)
        _gemv_kernels[block_m][lambda meta: (triton.cdiv(intermediate, meta["BLOCK_N"]),)](
            x_rows, x_rows.stride(0), weight, up_offset, out, rows, hidden, intermediate, float(eps),
            BLOCK_M=block_m)
    else:
        precision, dot_dtype = dot_settings(x)
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(intermediate, meta["BLOCK_N"]),)
        _norm_swiglu_tiled_kernel[grid](x_rows, x_rows.stride(0), weight, up_offset, out, rows, hidden, intermediate,
                                        triton.next_power_of_2(rows), float(eps), DOT_PRECISION=precision,
                                        DOT_DTYPE=dot_dtype)
    return out
