"""The small ops the model calls, and the one place that decides how they run.

Mode "triton" runs the fused Triton kernels of `kernels/` (on CUDA, or on CPU tensors under TRITON_INTERPRET=1
for tests); mode "torch" runs their plain-torch references. "auto" (the default) picks Triton for CUDA tensors
when Triton is installed and torch elsewhere. Override with `set_kernels()` / `load(kernels=...)` or the
environment variable LLMDROP_RT_KERNELS, e.g. to profile or debug one path against the other.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import kernels

MODES = ("auto", "triton", "torch")
_mode = os.environ.get("LLMDROP_RT_KERNELS", "auto")


def set_kernels(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r} is not one of {MODES}")
    if mode == "triton" and not kernels.HAVE_TRITON:
        raise ValueError("kernels='triton' asked for, but the triton package is not installed")
    _mode = mode


def uses_triton(device: torch.device) -> bool:
    if _mode == "auto":
        return device.type == "cuda" and kernels.HAVE_TRITON
    return _mode == "triton"


def rms_norm(x, weight, eps):
    """Llama's RMSNorm: normalise in fp32, cast back, then scale (transformers' cast order)."""
    if uses_triton(x.device):
        return kernels.rms_norm(x, weight, eps)
    if x.dtype == torch.float32:
        # One fused op instead of six, bit-identical to the reference in fp32 (where there is no cast to order).
        return F.rms_norm(x, weight.shape, weight, eps)
    return kernels.rms_norm_reference(x, weight, eps)


def add_rms_norm_(residual, delta, weight, eps):
    """residual += delta in place; returns rms_norm(residual)."""
    if uses_triton(residual.device):
        return kernels.add_rms_norm_(residual, delta, weight, eps)
    residual += delta
    return rms_norm(residual, weight, eps)


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


def apply_rope(q, k, rope: RopeTables):
    """Rotate-half RoPE on q [B, T, Hq, D] and k [B, T, Hkv, D] (views of the qkv output; may be done in place)."""
    if uses_triton(q.device):
        return kernels.apply_rope_(q, k, rope.cos, rope.sin)
    if q.shape[1] == 1:
        rotation = rope.rotation(q.dtype)
        return q @ rotation, k @ rotation
    cos, sin = rope.full(q.dtype)
    half = q.shape[-1] // 2
    return q * cos + q.roll(half, -1) * sin, k * cos + k.roll(half, -1) * sin


def norm_swiglu(x, folded: kernels.NormMLPWeights, eps):
    """silu(gate) * up of rms_norm(x), with the norm weight folded into gate/up (see kernels/norm_mlp.py)."""
    return (kernels.norm_swiglu if uses_triton(x.device) else kernels.norm_swiglu_reference)(x, folded, eps)


def silu_mul(gate, up):
    return F.silu(gate) * up


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)
