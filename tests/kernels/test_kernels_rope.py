"""In-place rotary embedding kernel against a float64 oracle, on contiguous and fused-qkv views.

Runs on CUDA when present, otherwise the Triton interpreter on CPU (see conftest.py).
"""
import zlib

import pytest
import torch

from llmdrop_rt.kernels.rope import apply_rope_, apply_rope_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One rounding of an fp32 result; Triton's interpreter truncates fp32 -> bf16 instead of rounding.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2 if DEVICE == "cuda" else 2e-2}
# (batch, length, q heads, kv heads, head dim): decode, GQA, MHA, odd half-dims.
SHAPES = [(1, 1, 4, 1, 64), (2, 5, 9, 3, 64), (1, 7, 8, 8, 128), (3, 2, 2, 1, 6), (2, 3, 5, 1, 96)]


def generator_for(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def gathered_tables(batch, length, head_dim, generator, theta=10000.0):
    """cos/sin at a random position per (batch, row), as the runtime gathers them."""
    positions = torch.randint(0, 8192, (batch, length), generator=generator, dtype=torch.float64)
    inverse_frequency = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions[..., None] * inverse_frequency
    return angles.cos().float().to(DEVICE), angles.sin().float().to(DEVICE)


def oracle_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    half = x.shape[-1] // 2
    cos64, sin64 = cos.double()[:, :, None, :], sin.double()[:, :, None, :]
    first, second = x64[..., :half], x64[..., half:]
    return torch.cat((first * cos64 - second * sin64, second * cos64 + first * sin64), dim=-1)


def random_heads(shape, dtype, generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    scale = torch.exp(torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(-3, 3, generator=generator))
    return (values * scale).to(dtype).to(DEVICE)


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all(), "rotated tensor has non-finite elements"
    rtol = RTOL[dtype]
    head_scale = expected.abs().amax(-1, keepdim=True)  # rotation mixes the two halves of a head
    error = (actual.double() - expected).abs()
    worst = (error / (rtol * expected.abs() + 0.1 * rtol * head_scale)).max().item()
    assert worst <= 1.0, f"error exceeds tolerance by a factor {worst:.3g} (rtol {rtol})"


@pytest.mark.parametrize("rope", [apply_rope_, apply_rope_reference], ids=["triton", "torch_reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_on_fused_qkv_views(request, rope, shape, dtype):
    batch, length, q_heads, kv_heads, head_dim = shape
    generator = generator_for(request)
    qkv = random_heads((batch, length, q_heads + 2 * kv_heads, head_dim), dtype, generator)
    q = qkv[:, :, :q_heads]
    k = qkv[:, :, q_heads:q_heads + kv_heads]
    v_before = qkv[:, :, q_heads + kv_heads:].clone()
    cos, sin = gathered_tables(batch, length, head_dim, generator)
    expected_q, expected_k = oracle_rope(q, cos, sin), oracle_rope(k, cos, sin)

    returned = rope(q, k, cos, sin)

    assert returned[0] is q and returned[1] is k
    assert_close_to_oracle(qkv[:, :, :q_heads], expected_q, dtype)
    assert_close_to_oracle(qkv[:, :, q_heads:q_heads + kv_heads], expected_k, dtype)
    assert torch.equal(qkv[:, :, q_heads + kv_heads:], v_before), "rope wrote into v"


@pytest.mark.parametrize("rope", [apply_rope_, apply_rope_reference], ids=["triton", "torch_reference"])
def test_rope_on_separate_tensors_with_broadcast_tables(request, rope):
    generator = generator_for(request)
    batch, length, head_dim = 3, 4, 64
    q = random_heads((batch, length, 6, head_dim), torch.float32, generator)
    k = random_heads((batch, length, 2, head_dim), torch.float32, generator)
    cos, sin = gathered_tables(1, length, head_dim, generator)
    cos_b, sin_b = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)  # batch stride 0
    expected_q, expected_k = oracle_rope(q, cos_b, sin_b), oracle_rope(k, cos_b, sin_b)

    rope(q, k, cos_b, sin_b)

    assert_close_to_oracle(q, expected_q, torch.float32)
    assert_close_to_oracle(k, expected_k, torch.float32)


def test_rope_matches_hf_apply_rotary_pos_emb(request):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    generator = generator_for(request)
    q = random_heads((2, 5, 4, 64), torch.float32, generator)
    k = random_heads((2, 5, 2, 64), torch.float32, generator)
    cos, sin = gathered_tables(2, 5, 64, generator)
    # HF takes full-width tables (each half repeated) and q/k as [B, heads, T, D] with unsqueeze_dim=1.
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    expected_q, expected_k = llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)

    apply_rope_(q, k, cos, sin)

    torch.testing.assert_close(q, expected_q.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, expected_k.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_bad_tables_are_named():
    q = torch.ones(1, 2, 4, 8, device=DEVICE)
    k = torch.ones(1, 2, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos must have shape \(1, 2, 4\)"):
        apply_rope_(q, k, torch.ones(1, 2, 8, device=DEVICE), torch.ones(1, 2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="sin must be float32"):
        apply_rope_(q, k, torch.ones(1, 2, 4, device=DEVICE), torch.ones(1, 2, 4, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="head dim must be even"):
        apply_rope_(torch.ones(1, 2, 4, 7, device=DEVICE), torch.ones(1, 2, 2, 7, device=DEVICE),
                    torch.ones(1, 2, 3, device=DEVICE), torch.ones(1, 2, 3, device=DEVICE))
