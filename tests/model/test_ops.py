"""The runtime's plain-torch ops (model/ops.py) against the kernel references they shortcut, and how a model's ops
are chosen."""
import pytest
import torch

from llmdrop_rt import kernels
from llmdrop_rt.model import rope_tables
from llmdrop_rt.model.ops import TORCH as ops


@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 17, 64), (2, 5, 96)])
def test_fp32_rms_norm_is_bit_identical_to_the_reference(shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 30
    weight = torch.randn(shape[-1], generator=gen)
    assert torch.equal(ops.rms_norm(x, weight, 1e-5), kernels.rms_norm_reference(x, weight, 1e-5))
    residual, delta = x.clone(), torch.randn(shape, generator=gen)
    expected = kernels.add_rms_norm_reference(x.clone(), delta, weight, 1e-5)
    assert torch.equal(ops.add_rms_norm_(residual, delta, weight, 1e-5), expected)
    assert torch.equal(residual, x + delta)


def test_half_precision_rms_norm_keeps_the_reference_cast_order():
    x = torch.randn(2, 3, 64).bfloat16()
    weight = torch.randn(64).bfloat16()
    assert torch.equal(ops.rms_norm(x, weight, 1e-6), kernels.rms_norm_reference(x, weight, 1e-6))


@pytest.mark.parametrize("batch,q_heads,kv_heads,head_dim", [(1, 9, 3, 64), (3, 5, 1, 6), (2, 4, 4, 128)])
def test_single_token_rope_by_rotation_matrix_matches_the_elementwise_rotation(batch, q_heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    tables = rope_tables(inv_freq, torch.randint(0, 8192, (batch, 1), generator=gen))
    q = torch.randn(batch, 1, q_heads, head_dim, generator=gen)
    k = torch.randn(batch, 1, kv_heads, head_dim, generator=gen)
    rotated_q, rotated_k = ops.apply_rope(q, k, tables)  # T == 1: the rotation-matrix path
    cos, sin = tables.full(torch.float32)
    half = head_dim // 2
    torch.testing.assert_close(rotated_q, q * cos + q.roll(half, -1) * sin, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rotated_k, k * cos + k.roll(half, -1) * sin, rtol=1e-6, atol=1e-6)
