"""What every kernel file shares: the optional Triton import and the tl.dot settings for an activation dtype."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references beside each kernel still work without Triton
    triton = tl = None

HAVE_TRITON = triton is not None


def dot_settings(x: torch.Tensor):
    """(input_precision, operand dtype) for the tl.dot of a GEMM whose activations are `x`.

    TF32 would cost fp32 inputs ~1e-3 relative accuracy, so fp32 multiplies in IEEE precision; 16-bit inputs
    ignore the setting. CPU tensors mean Triton's interpreter, whose tl.dot multiplies bf16 operands as their raw
    16-bit patterns: widening the tiles to fp32 there gives the product a GPU computes.
    """
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return precision, tl.float32
    return precision, {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[x.dtype]
