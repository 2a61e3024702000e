"""The small ops the model calls. One home for choosing how each runs (plain torch here; fused kernels plug in
behind the same names)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    """Llama's RMSNorm: normalise in fp32, cast back, then scale (transformers' cast order)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(q, k, cos, sin):
    """Rotate-half RoPE on q [B, T, Hq, D] and k [B, T, Hkv, D]; cos/sin [B, T, D/2]."""
    cos, sin = cos[:, :, None], sin[:, :, None]

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)


def silu_mul(gate, up):
    return F.silu(gate) * up


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)
