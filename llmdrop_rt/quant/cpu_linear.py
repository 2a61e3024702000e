"""Linear layers for CPU decoding on weights stored as fp32, fp16, bf16 or ggml's q8_0 / q4_0 / q4_1 blocks.

The block formats are GGUF's, byte for byte: a weight [out, in] is held as uint8 [out, in / 32 * block_bytes],
each output row's blocks of 32 consecutive input columns back to back (little-endian fp16 scales):

* q8_0, 34 bytes: fp16 d, int8 q[32];           w = d * q
* q4_0, 18 bytes: fp16 d, uint8 qs[16];         w = d * (q - 8)
* q4_1, 20 bytes: fp16 d, fp16 m, uint8 qs[16]; w = d * q + m

where ``qs[j]`` holds element ``j`` in its low nibble and element ``j + 16`` in its high nibble. A GGUF tensor of
one of these types therefore is already a valid stored weight (its raw bytes, one row per output feature), and
`quantize` reproduces gguf's reference quantizers (``gguf.quants.quantize``) bit for bit.

The kernels read block formats in a row-interleaved layout of the same bytes (`interleave`; the file comment of
csrc/cpu_gemv.h draws it): every 8 output rows store their blocks of one column together, values in lanes, so
that one vector load holds a few columns of 8 rows. `CpuLinear` and `CpuEmbedding` interleave what they are given
and hold only that; `deinterleave` gives the GGUF bytes back.

`CpuLinear` runs the compiled kernels of ``llmdrop_rt._cpu_gemv`` (csrc/cpu_gemv.cpp) when they are built, and a
pure-torch dequantize-and-matmul otherwise; its ``path`` says which.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..extensions import compiled_ops

BLOCK = 32  # input columns per quantisation block
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
DENSE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
FORMATS = (*DENSE_DTYPES, *BLOCK_BYTES)
# Up to this many rows the kernels run a fused GEMV; above it the dense formats run a GEMM (`dense_linear`),
# and the block formats keep their integer kernels (q8_0 on one thread excepted: tiles + GEMM there), which beat
# the tiles at prefill shapes (kGemvMaxRows and fused_kernels_for in csrc/cpu_gemv.h).
GEMV_MAX_ROWS = 8
# Output rows interleaved in the block formats' kernel layout, and the bytes of a lane (kGroupRows, kLaneBytes).
GROUP_ROWS = 8
LANE_BYTES = {"q8_0": 2, "q4_0": 4, "q4_1": 4}
SCALE_BYTES = {"q8_0": 2, "q4_0": 2, "q4_1": 4}  # fp16 d (and m) opening each block


ops = compiled_ops("_cpu_gemv", "llmdrop_cpu_gemv")


def _onednn_linear():
    """oneDNN's fp32 GEMM as torch exposes it (the op torch.compile's CPU backend calls for linear layers), or
    None where this torch lacks it. Its fp32 arithmetic is exact fp32; on some CPUs (AMD's) it runs at about twice
    the rate of ATen's own fp32 GEMM (MKL's)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


onednn_linear = _onednn_linear()


def dense_gemm() -> str:
    """Which GEMM the dense formats' prefill runs: "onednn" or "aten" (see dense_linear)."""
    return "aten" if onednn_linear is None else "onednn"


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for fp32 x [rows, in] and weight [out, in]: oneDNN's GEMM, or F.linear without it."""
    if onednn_linear is None:
        return F.linear(x, weight, bias)
    return onednn_linear(x.contiguous(), weight, bias, "none", [], "")


# --------------------------------------------------------------------------------------------------
# Quantizers: gguf.quants' reference arithmetic (float32, separately rounded operations) in torch
# --------------------------------------------------------------------------------------------------
def kernel_isa() -> str:
    """Which compiled kernels the CPU weight formats run: "avx2" (AVX2 + FMA + F16C), "avx2+avx512vnni" (the dense
    formats' kernels and the block formats' kernels for several activation rows in AVX-512 VNNI as well),
    "portable", or "torch" where the extension is not built."""
    if ops is None:
        return "torch"
    width = ops.simd_width()
    return {512: "avx2+avx512vnni", 256: "avx2"}.get(width, "portable")


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"block formats need a 2-D weight with in % {BLOCK} == 0, got {tuple(weight.shape)}")
    return weight.detach().to(torch.float32).reshape(-1, BLOCK)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, 0.0, 1.0 / d)


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[n, 1] float32 -> [n, 2] the little-endian bytes of its fp16 rounding."""
    return values.to(torch.float16).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] values 0..15 -> [n, 16] bytes: element j in the low nibble of byte j, element j + 16 in its high one."""
    return q[:, :16] | (q[:, 16:] << 4)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf, computed as gguf's np_roundf does (exact in float32, unlike floor(|v| + 0.5))."""
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(weight)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=1).reshape(weight.shape[0], -1)


def quantize_q4_0(weight: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(weight)
    # d = (the value of largest magnitude, with its sign) / -8: that value becomes q = 0, i.e. w = -8 d.
    signed_max = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = signed_max / -8
    q = (blocks * _inverse(d) + 8.5).trunc().to(torch.uint8).clamp_max(15)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1).reshape(weight.shape[0], -1)


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    blocks = _blocks(weight)
    low = blocks.amin(dim=1, keepdim=True)
    d = (blocks.amax(dim=1, keepdim=True) - low) / 15
    q = ((blocks - low) * _inverse(d) + 0.5).trunc().to(torch.uint8).clamp_max(15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(low), _pack_nibbles(q)], dim=1).reshape(weight.shape[0], -1)


_QUANTIZERS = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_1": quantize_q4_1}


def quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """A float weight [out, in] in format `fmt`: a dense tensor of its dtype, or the uint8 blocks."""
    _check_format(fmt)
    if fmt in DENSE_DTYPES:
        return weight.detach().to(DENSE_DTYPES[fmt]).contiguous()
    return _QUANTIZERS[fmt](weight)


def dequantize(stored: torch.Tensor, fmt: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The weight [out, in] that `stored` represents. In float64 it is exact (every weight of these formats is)."""
    _check_format(fmt)
    if fmt in DENSE_DTYPES:
        return stored.to(dtype)
    nbytes = BLOCK_BYTES[fmt]
    if stored.dtype != torch.uint8 or stored.dim() != 2 or stored.shape[1] % nbytes:
        raise ValueError(f"{fmt} weights are uint8 [out, in / {BLOCK} * {nbytes}], got {stored.dtype} "
                         f"{tuple(stored.shape)}")
    blocks = stored.reshape(stored.shape[0], -1, nbytes)

    def fp16_at(offset: int) -> torch.Tensor:
        return blocks[..., offset:offset + 2].contiguous().view(torch.float16).to(dtype)

    d = fp16_at(0)
    if fmt == "q8_0":
        w = d * blocks[..., 2:].contiguous().view(torch.int8).to(dtype)
    else:
        qs = blocks[..., nbytes - BLOCK // 2:]  # the nibbles close each block
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(dtype)
        w = d * (q - 8) if fmt == "q4_0" else d * q + fp16_at(2)
    return w.reshape(stored.shape[0], -1)


def interleave(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """A stored weight (GGUF's row layout) in the kernels' layout: the same shape and bytes, each full group of
    8 rows rearranged so that block column b of all 8 rows lies together as [d x 8, (m x 8,) lanes], lane k
    holding value bytes k*L .. k*L+L-1 of rows 0..7 in turn. Dense formats are returned as they are."""
    if fmt in DENSE_DTYPES:
        return stored
    groups, blocks, nbytes, lane = stored.shape[0] // GROUP_ROWS, stored.shape[1] // BLOCK_BYTES[fmt], \
        BLOCK_BYTES[fmt], LANE_BYTES[fmt]
    full = groups * GROUP_ROWS
    g = stored[:full].reshape(groups, GROUP_ROWS, blocks, nbytes)
    scales = [g[..., i:i + 2].permute(0, 2, 1, 3).reshape(groups, blocks, -1) for i in range(0, SCALE_BYTES[fmt], 2)]
    values = g[..., SCALE_BYTES[fmt]:].reshape(groups, GROUP_ROWS, blocks, -1, lane).permute(0, 2, 3, 1, 4)
    grouped = torch.cat([*scales, values.reshape(groups, blocks, -1)], dim=-1).reshape(full, -1)
    return torch.cat([grouped, stored[full:]]).contiguous()


def deinterleave(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """The inverse of `interleave`: a kernel-layout weight as GGUF's rows."""
    if fmt in DENSE_DTYPES:
        return weight
    groups, blocks, nbytes, lane = weight.shape[0] // GROUP_ROWS, weight.shape[1] // BLOCK_BYTES[fmt], \
        BLOCK_BYTES[fmt], LANE_BYTES[fmt]
    full, scale_bytes = groups * GROUP_ROWS, SCALE_BYTES[fmt]
    g = weight[:full].reshape(groups, blocks, GROUP_ROWS * nbytes)
    scales = [g[..., GROUP_ROWS * i:GROUP_ROWS * (i + 2)].reshape(groups, blocks, GROUP_ROWS, 2).permute(0, 2, 1, 3)
              for i in range(0, scale_bytes, 2)]
    values = g[..., GROUP_ROWS * scale_bytes:].reshape(groups, blocks, -1, GROUP_ROWS, lane).permute(0, 3, 1, 2, 4)
    rows = torch.cat([*scales, values.reshape(groups, GROUP_ROWS, blocks, -1)], dim=-1).reshape(full, -1)
    return torch.cat([rows, weight[full:]]).contiguous()


def deinterleaved_rows(weight: torch.Tensor, fmt: str, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (1-D) of a kernel-layout weight as GGUF's rows, ungrouping only the groups they lie in."""
    if fmt in DENSE_DTYPES:
        return weight[index]
    full = weight.shape[0] // GROUP_ROWS * GROUP_ROWS
    rows = weight.new_empty(index.shape[0], weight.shape[1])
    grouped = index < full
    if grouped.any():
        wanted = index[grouped]
        groups = weight[:full].reshape(-1, GROUP_ROWS, weight.shape[1])[wanted // GROUP_ROWS]
        ungrouped = deinterleave(groups.reshape(-1, weight.shape[1]), fmt).reshape(groups.shape)
        rows[grouped] = ungrouped[torch.arange(wanted.shape[0]), wanted % GROUP_ROWS]
    rows[~grouped] = weight[index[~grouped]]
    return rows


def in_features_of(stored: torch.Tensor, fmt: str) -> int:
    """The input features of a stored weight (its columns; 32 per block of the block formats)."""
    _check_format(fmt)
    return stored.shape[1] if fmt in DENSE_DTYPES else stored.shape[1] // BLOCK_BYTES[fmt] * BLOCK


def _check_format(fmt: str):
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------
class CpuLinear(torch.nn.Module):
    """y = x @ W.T + bias for fp32 x [..., in] and W stored in one of `FORMATS`; y is fp32.

    path, the code that runs a call:
      "kernel"    the compiled op torch.ops.llmdrop_cpu_gemv.gemv_<fmt> (its fused GEMV up to GEMV_MAX_ROWS rows;
                  above, the block formats' integer kernels or, for dense formats, dequantised tiles and ATen's
                  GEMM: see GEMV_MAX_ROWS), except that dense calls with more rows go to `dense_linear`
                  (oneDNN's GEMM through torch, or for f32 F.linear without it);
      "torch"     F.linear on the stored weight (f32 only: F.linear wants x and W of one dtype);
      "reference" dequantize to fp32, then F.linear (what "auto" picks where the extension is not built).
    "auto" picks "kernel" for every format and shape, by a rule measured with bench/bench_cpu_gemv.py: at 1-8 rows
    the kernel beat F.linear fp32 on every decode shape measured (SmolLM2-135M and Llama-7B projections, 1 and 2
    threads, cold weights); above 8 rows the dense formats run the same GEMM, the block formats their integer
    kernels where those measured faster (GEMV_MAX_ROWS). torch's bf16 F.linear, faster for many rows
    where the CPU has bf16 dot products, is not a candidate: it would round x to bf16.
    """

    def __init__(self, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None, path: str = "auto",
                 *, interleaved: bool = False):
        """weight: as `quantize` returns it (GGUF's layout), or already `interleave`d (interleaved=True: a table
        shared with a `CpuEmbedding`). `self.weight` holds the kernels' layout; `stored()` gives GGUF's back."""
        super().__init__()
        _check_format(fmt)
        self.fmt = fmt
        self.out_features = weight.shape[0]
        self.in_features = in_features_of(weight, fmt)
        self.register_buffer("weight", weight.contiguous() if interleaved else interleave(weight.contiguous(), fmt))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self.path = self._choose_path(path)

    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None,
                   path: str = "auto") -> "CpuLinear":
        return cls(quantize(weight, fmt), fmt, bias, path)

    def _choose_path(self, requested: str) -> str:
        if requested not in ("auto", "kernel", "torch", "reference"):
            raise ValueError(f"unknown path {requested!r}")
        if requested == "torch" and self.fmt != "f32":
            raise ValueError("path 'torch' needs an f32 weight (F.linear wants x and W of one dtype)")
        if requested == "kernel" and ops is None:
            raise RuntimeError("path 'kernel' needs llmdrop_rt._cpu_gemv, which is not built")
        if requested != "auto":
            return requested
        return "reference" if ops is None else "kernel"

    def stored(self) -> torch.Tensor:
        """The weight as `quantize` returns it (GGUF's layout)."""
        return deinterleave(self.weight, self.fmt)

    def weight_bytes(self) -> int:
        """Bytes a forward pass streams from the weight (and bias)."""
        size = self.weight.numel() * self.weight.element_size()
        return size + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.path == "torch":
            y = F.linear(x2, self.weight, self.bias)
        elif self.path == "kernel" and self._gemm_rows(x2.shape[0]):
            y = dense_linear(x2, self.weight.to(torch.float32), self.bias)
        elif self.path == "kernel":
            y = getattr(ops, f"gemv_{self.fmt}")(x2, self.weight, self.bias)
        else:
            y = F.linear(x2, dequantize(self.stored(), self.fmt, torch.float32), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _gemm_rows(self, rows: int) -> bool:
        """Whether a call of `rows` rows on the kernel path goes to `dense_linear`: more rows than a GEMV of a
        dense weight, fp32 always, fp16 / bf16 (converted to fp32 for the call) where oneDNN is there; otherwise the
        op's dequantised tiles and ATen's GEMM."""
        return rows > GEMV_MAX_ROWS and (self.fmt == "f32" or self.fmt in DENSE_DTYPES and onednn_linear is not None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, path={self.path}"


class CpuEmbedding(torch.nn.Module):
    """Token embeddings from a table stored in one of `FORMATS` (given as `quantize` returns it, held interleaved;
    rows dequantized to fp32 as they are looked up); a tied output projection is `tied_head()`, a `CpuLinear`
    over the same held tensor."""

    def __init__(self, weight: torch.Tensor, fmt: str):
        super().__init__()
        _check_format(fmt)
        self.fmt = fmt
        self.register_buffer("weight", interleave(weight.contiguous(), fmt))

    def tied_head(self) -> CpuLinear:
        return CpuLinear(self.weight, self.fmt, interleaved=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        index = tokens.reshape(-1)
        if ops is not None:
            rows = getattr(ops, f"rows_{self.fmt}")(self.weight, index)
        else:
            rows = dequantize(deinterleaved_rows(self.weight, self.fmt, index), self.fmt, torch.float32)
        return rows.reshape(*tokens.shape, -1)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.weight.shape[0]}, fmt={self.fmt}"
