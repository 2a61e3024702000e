"""Fused Triton kernels for the runtime's hot ops, each with a plain-torch reference (`llmdrop_rt.kernels`).

The Triton functions need a CUDA device (or Triton's CPU interpreter, for tests); the
``*_reference`` functions are the runtime's path everywhere else and need only torch.
``HAVE_TRITON`` says whether Triton could be imported.
"""
from ._triton import HAVE_TRITON
from .int4_gemm import int4_gemm, int4_gemm_reference
from .norm_mlp import DECODE_MAX_ROWS, NormMLPWeights, norm_swiglu, norm_swiglu_reference, prepare_norm_mlp
from .rms_norm import add_rms_norm_, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rope import apply_rope_, apply_rope_reference

__all__ = [
    "HAVE_TRITON",
    "DECODE_MAX_ROWS",
    "NormMLPWeights",
    "add_rms_norm_",
    "add_rms_norm_reference",
    "apply_rope_",
    "apply_rope_reference",
    "int4_gemm",
    "int4_gemm_reference",
    "norm_swiglu",
    "norm_swiglu_reference",
    "prepare_norm_mlp",
    "rms_norm",
    "rms_norm_reference",
]
