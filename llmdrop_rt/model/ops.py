"""The small ops the model calls, in two implementations, one of which is chosen per model at load time.

`TORCH` runs plain-torch code (the kernels' references, or fused torch calls that equal them); `TRITON` runs the
fused Triton kernels of `llmdrop_rt.kernels` (on CUDA, or on CPU tensors under TRITON_INTERPRET=1 for tests).
`select_ops(mode, device)` picks one: "auto" (the default) takes Triton for CUDA when Triton is installed and
torch elsewhere; "triton" / "torch" force one, e.g. to profile or debug one path against the other. The mode comes
from `load(kernels=...)`, else the environment variable LLMDROP_RT_KERNELS. Each module keeps the ops it was
built with, so two models loaded with different modes run side by side.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import kernels

MODES = ("auto", "triton", "torch")
ENV_VAR = "LLMDROP_RT_KERNELS"


class RopeTables:
    """One step's rotary tables, built once and shared by every layer.

    `cos`/`sin` are fp32 [B, T, D/2] (what the Triton kernel reads). The torch path uses full-width tables in the
    activation dtype with the rotate-half sign folded into sin, so one rotation is 4 ops:
    x * cos + roll(x, D/2) * [-sin, sin]. A single-token step (decode) instead multiplies by one D x D rotation
    matrix per row: a single small matmul, where the 4 elementwise ops would cost several times more in dispatch.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self.cos, self.sin = cos, sin
        self._full: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rotation: dict[torch.dtype, torch.Tensor] = {}

    def full(self, dtype):
        if dtype not in self._full:
            cos = torch.cat([self.cos, self.cos], dim=-1)[:, :, None].to(dtype)
            sin = torch.cat([-self.sin, self.sin], dim=-1)[:, :, None].to(dtype)
            self._full[dtype] = (cos, sin)
        return self._full[dtype]

    def rotation(self, dtype):
        """[B, T, D, D] matrices R with x @ R == x * cos + roll(x, D/2) * [-sin, sin] for x [..., D]."""
        if dtype not in self._rotation:
            cos, sin = self.full(dtype)
            dim = cos.shape[-1]
            identity = torch.eye(dim, dtype=dtype, device=cos.device)
            # Row j of R feeds output column i: j == i (times cos) and j == i + D/2 mod D (times the signed sin).
            self._rotation[dtype] = identity * cos + identity.roll(dim // 2, 0) * sin
        return self._rotation[dtype]


class TorchOps:
    """Plain torch, on any device."""

    name = "torch"

    @staticmethod
    def rms_norm(x, weight, eps):
        """Llama's RMSNorm: normalise in fp32, cast back, then scale (transformers' cast order)."""
        if x.dtype == torch.float32:
            # One fused op instead of six, bit-identical to the reference in fp32 (where there is no cast to order).
            return F.rms_norm(x, weight.shape, weight, eps)
        return kernels.rms_norm_reference(x, weight, eps)

    def add_rms_norm_(self, residual, delta, weight, eps):
        """residual += delta in place; returns rms_norm(residual)."""
        residual += delta
        return self.rms_norm(residual, weight, eps)

    @staticmethod
    def apply_rope(q, k, rope: RopeTables):
        """Rotate-half RoPE on q [B, T, Hq, D] and k [B, T, Hkv, D] (views of the qkv output)."""
        if q.shape[1] == 1:
            rotation = rope.rotation(q.dtype)
            return q @ rotation, k @ rotation
        cos, sin = rope.full(q.dtype)
        half = q.shape[-1] // 2
        return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin

    @staticmethod
    def norm_swiglu(x, folded: kernels.NormMLPWeights, eps):
        """silu(gate) * up of rms_norm(x), with the norm weight folded into gate/up (see kernels/norm_mlp.py)."""
        return kernels.norm_swiglu_reference(x, folded, eps)

    @staticmethod
    def silu_mul(gate, up):
        return F.silu(gate) * up

    @staticmethod
    def gelu_tanh_mul(gate, up):
        return F.gelu(gate, approximate="tanh") * up


class TritonOps(TorchOps):
    """The fused Triton kernels where one exists; torch for the rest."""

    name = "triton"

    @staticmethod
    def rms_norm(x, weight, eps):
        return kernels.rms_norm(x, weight, eps)

    @staticmethod
    def add_rms_norm_(residual, delta, weight, eps):
        return kernels.add_rms_norm_(residual, delta, weight, eps)

    @staticmethod
    def apply_rope(q, k, rope: RopeTables):
        return kernels.apply_rope_(q, k, rope.cos, rope.sin)

    @staticmethod
    def norm_swiglu(x, folded: kernels.NormMLPWeights, eps):
        return kernels.norm_swiglu(x, folded, eps)


TORCH, TRITON = TorchOps(), TritonOps()


def select_ops(mode: str | None, device: torch.device) -> TorchOps:
    """The ops for a model on `device` under kernels mode `mode` (None: $LLMDROP_RT_KERNELS, else "auto")."""
    source = "kernels"
    if mode is None:
        mode, source = os.environ.get(ENV_VAR) or "auto", f"${ENV_VAR}"
    if mode not in MODES:
        raise ValueError(f"{source}={mode!r} is not one of {MODES}")
    if mode == "triton" and not kernels.HAVE_TRITON:
        raise ValueError(f"{source}='triton' asked for, but the triton package is not installed")
    if mode == "auto":
        return TRITON if device.type == "cuda" and kernels.HAVE_TRITON else TORCH
    return TRITON if mode == "triton" else TORCH
