"""`QuantLinear`: a linear layer over 4-bit AWQ/GPTQ weights, run by the fastest kernel this installation has."""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from .. import kernels
from ..extensions import compiled_ops
from .formats import (
    NIBBLES_PER_WORD,
    Int4Weights,
    QuantConfig,
    pack_nibbles,
    unpack_awq_gemm,
    unpack_gptq,
    unpack_nibbles,
)

BACKEND_ENV = "LLMDROP_RT_INT4_BACKEND"
BACKENDS = ("reference", "cpp", "cuda", "triton")
# Up to this many rows (decode) a GEMV kernel wins on GPUs; above it (prefill) the tensor-core Triton GEMM.
GEMV_MAX_ROWS = 8


# --------------------------------------------------------------------------------------------------
# Compiled kernels (optional)
# --------------------------------------------------------------------------------------------------
_int4_cpu = compiled_ops("_int4_cpu", "llmdrop_int4_cpu")
_int4_cuda = compiled_ops("_int4_cuda", "llmdrop_int4_cuda")


def available_backends() -> dict[str, bool]:
    """Which int4 backends this installation can run (triton: on CUDA tensors, or any under TRITON_INTERPRET=1)."""
    return {"reference": True, "cpp": _int4_cpu is not None, "cuda": _int4_cuda is not None,
            "triton": kernels.HAVE_TRITON}


def _backend_override() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}: expected one of {BACKENDS}")
    return value


# --------------------------------------------------------------------------------------------------
# QuantLinear
# --------------------------------------------------------------------------------------------------
class QuantLinear(torch.nn.Module):
    """A linear layer with 4-bit weights, y = x @ W.T + bias.

    Kernel layout (the same for AWQ and GPTQ, built once at load time):

    * ``qweight`` int32 [out, in/8]: word k of row o holds q[o, 8k + j] in bits 4j..4j+3 (low first),
      over the input columns in *kernel order*.
    * ``scales`` / ``zeros`` [out, groups] in the scale dtype (fp16 for checkpoints; zeros are small
      integers, exact in fp16), group of kernel column c = c // group_size.
    * ``input_perm`` int64 [in] or None: with GPTQ desc_act, input columns are sorted by group so that
      groups are contiguous; the forward then gathers ``x[..., input_perm]`` before the kernel.

    Backend: ``LLMDROP_RT_INT4_BACKEND=reference|cpp|cuda|triton`` forces one; otherwise CUDA tensors use
    the Triton tensor-core GEMM above `GEMV_MAX_ROWS` rows and the CUDA extension's GEMV up to it (Triton
    for both when the extension is not built), CPU tensors the C++ extension, and the pure-torch
    reference when none of these is there.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 in_features: int, out_features: int, input_perm: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("input_perm", input_perm)
        self.register_buffer("bias", bias)

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_int4(cls, weights: Int4Weights, group_size: int, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build the kernel layout from canonical weights. g_idx must put exactly `group_size` columns in
        each group (fewer in the last), as every AWQ/GPTQ quantizer does."""
        out_features, in_features = weights.qvalues.shape
        g_idx = weights.g_idx
        canonical = torch.arange(in_features, device=g_idx.device) // group_size
        if torch.equal(g_idx, canonical):
            input_perm = None
            qvalues = weights.qvalues
        else:
            input_perm = torch.argsort(g_idx, stable=True)
            if not torch.equal(g_idx[input_perm], canonical):
                counts = torch.bincount(g_idx, minlength=weights.scales.shape[0]).tolist()
                raise ValueError(
                    f"g_idx: each group must hold {group_size} input columns (the last may hold fewer); "
                    f"got counts {counts[:8]}{'...' if len(counts) > 8 else ''}"
                )
            qvalues = weights.qvalues[:, input_perm]
        qweight = pack_nibbles(qvalues, dim=1).contiguous()
        scales = weights.scales.t().contiguous()
        zeros = weights.zeros.t().to(scales.dtype).contiguous()
        return cls(qweight, scales, zeros, group_size, in_features, out_features, input_perm, bias)

    @classmethod
    def from_checkpoint(cls, get_tensor: Callable[[str], torch.Tensor], prefix: str, in_features: int,
                        out_features: int, qconfig: QuantConfig, bias: bool) -> "QuantLinear":
        """Read ``prefix.qweight``/``.qzeros``/``.scales`` (+ ``.g_idx`` for GPTQ, ``.bias`` when `bias`)
        through `get_tensor(full_name)` (which raises KeyError for a missing name), validate every shape
        and dtype, and repack for the kernels. Raises ValueError naming the tensor, expected vs got."""
        if in_features % NIBBLES_PER_WORD or out_features % NIBBLES_PER_WORD:
            raise ValueError(f"{prefix}: in_features={in_features} and out_features={out_features} "
                             "must be multiples of 8 for 4-bit packing")
        group_size = qconfig.group_size_for(in_features)
        groups = math.ceil(in_features / group_size)

        def read(name: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
                 optional: bool = False) -> torch.Tensor | None:
            full = f"{prefix}.{name}"
            try:
                tensor = get_tensor(full)
            except KeyError as e:
                if optional:
                    return None
                raise ValueError(f"{full}: missing from the checkpoint") from e
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{full}: expected a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{full}: expected shape {list(shape)}, got {list(tensor.shape)} "
                                 f"({qconfig.checkpoint_format}, in={in_features}, out={out_features}, "
                                 f"group_size={qconfig.group_size})")
            if tensor.dtype not in dtypes:
                raise ValueError(f"{full}: expected dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")
            return tensor

        float_dtypes = (torch.float16, torch.bfloat16, torch.float32)
        if qconfig.method == "awq":
            if in_features % group_size:
                raise ValueError(f"{prefix}: AWQ group_size={group_size} must divide in_features={in_features}")
            qweight = read("qweight", (in_features, out_features // 8), (torch.int32,))
            qzeros = read("qzeros", (groups, out_features // 8), (torch.int32,)) if qconfig.zero_point else None
            scales = read("scales", (groups, out_features), float_dtypes)
            weights = unpack_awq_gemm(qweight, qzeros, scales, group_size)
        elif qconfig.method == "gptq":
            qweight = read("qweight", (in_features // 8, out_features), (torch.int32,))
            qzeros = read("qzeros", (groups, out_features // 8), (torch.int32,))
            scales = read("scales", (groups, out_features), float_dtypes)
            canonical = torch.arange(in_features) // group_size
            # Older checkpoints without act-order may omit g_idx.
            g_idx = read("g_idx", (in_features,), (torch.int32, torch.int64), optional=not qconfig.desc_act)
            g_idx = canonical if g_idx is None else g_idx.to(torch.int64)
            if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
                bad = int(((g_idx < 0) | (g_idx >= groups)).nonzero()[0])
                raise ValueError(f"{prefix}.g_idx: entry {bad} is {int(g_idx[bad])}, expected 0..{groups - 1}")
            if not qconfig.desc_act and not torch.equal(g_idx, canonical.to(g_idx.device)):
                raise ValueError(f"{prefix}.g_idx: not i // {group_size} although desc_act is false")
            weights = unpack_gptq(qweight, qzeros, scales, g_idx, group_size, qconfig.zero_offset)
        else:
            raise ValueError(f"QuantConfig.method={qconfig.method!r} is not supported")
        if not torch.isfinite(weights.scales).all():
            raise ValueError(f"{prefix}.scales: contains NaN or infinity")
        bias_tensor = read("bias", (out_features,), float_dtypes) if bias else None
        try:
            return cls.from_int4(weights, group_size, bias_tensor)
        except ValueError as e:
            raise ValueError(f"{prefix}.{e}") from e

    # ---- introspection -----------------------------------------------------------------------------
    def int4_weights(self) -> Int4Weights:
        """The canonical weights back from the kernel layout (original input-column order)."""
        qvalues = unpack_nibbles(self.qweight, dim=1)
        g_idx = torch.arange(self.in_features, device=self.qweight.device) // self.group_size
        if self.input_perm is not None:
            restore = torch.argsort(self.input_perm)
            qvalues, g_idx = qvalues[:, restore], g_idx[restore]
        return Int4Weights(qvalues, self.zeros.t().to(torch.int16), self.scales.t(), g_idx)

    def weight_bytes(self) -> int:
        """Bytes held by this layer's tensors (packed weights, scales, zeros, permutation, bias)."""
        tensors = (self.qweight, self.scales, self.zeros, self.input_perm, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, act_order={self.input_perm is not None}")

    # ---- forward -----------------------------------------------------------------------------------
    def backend_for(self, x: torch.Tensor) -> str:
        """The backend `forward` will use for this input."""
        forced = _backend_override()
        if forced is not None:
            if not available_backends()[forced]:
                raise RuntimeError(f"{BACKEND_ENV}={forced}: that extension is not built in this installation")
            return forced
        if x.is_cuda:
            rows = x.numel() // self.in_features
            if kernels.HAVE_TRITON and (rows > GEMV_MAX_ROWS or _int4_cuda is None):
                return "triton"
            if _int4_cuda is not None:
                return "cuda"
        if x.device.type == "cpu" and _int4_cpu is not None:
            return "cpp"
        return "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear: input has {x.shape[-1]} features, expected {self.in_features}")
        backend = self.backend_for(x)
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.input_perm is not None:
            rows = rows.index_select(1, self.input_perm)
        if backend in ("reference", "triton"):
            gemm = kernels.int4_gemm_reference if backend == "reference" else kernels.int4_gemm
            out = gemm(rows, self.qweight, self.scales, self.zeros, self.group_size)
        else:
            kernel = _int4_cpu if backend == "cpp" else _int4_cuda
            out = kernel.int4_linear(rows.contiguous(), self.qweight, self.scales, self.zeros, self.group_size)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*leading, self.out_features)
