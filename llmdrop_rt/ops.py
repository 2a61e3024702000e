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
    return (kernels.rms_norm if uses_triton(x.device) else kernels.rms_norm_reference)(x, weight, eps)


def add_rms_norm_(residual, delta, weight, eps):
    """residual += delta in place; returns rms_norm(residual)."""
    fn = kernels.add_rms_norm_ if uses_triton(residual.device) else kernels.add_rms_norm_reference
    return fn(residual, delta, weight, eps)


def apply_rope_(q, k, cos, sin):
    """Rotate-half RoPE in place on q [B, T, Hq, D] and k [B, T, Hkv, D]; cos/sin fp32 [B, T, D/2]."""
    return (kernels.apply_rope_ if uses_triton(q.device) else kernels.apply_rope_reference)(q, k, cos, sin)


def norm_swiglu(x, folded: kernels.NormMLPWeights, eps):
    """silu(gate) * up of rms_norm(x), with the norm weight folded into gate/up (see kernels/norm_mlp.py)."""
    return (kernels.norm_swiglu if uses_triton(x.device) else kernels.norm_swiglu_reference)(x, folded, eps)


def silu_mul(gate, up):
    return F.silu(gate) * up


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)
