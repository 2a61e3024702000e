"""The Triton int4 GEMM (QuantLinear's prefill path on GPUs) against a float64 oracle, and inside QuantLinear.

Runs on CUDA when present, otherwise in Triton's interpreter on CPU (see conftest.py).
"""
import zlib

import pytest
import torch

from llmdrop_rt.kernels.int4_gemm import int4_gemm, int4_gemm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The weights are exact in every dtype after dequantization only up to one rounding; bf16 loses most. Triton's
# interpreter truncates fp32 -> bf16 casts instead of rounding, which doubles that on CPU.
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2 if DEVICE == "cuda" else 2e-2}

# (rows, in_features, out_features, group_size): one row to several row tiles, a last group only partly filled
# (200 = 3 x 64 + 8, as GPTQ allows), one group spanning everything, columns not a multiple of the tile.
CASES = [(1, 64, 40, 32), (5, 200, 72, 64), (33, 96, 136, 32), (70, 128, 64, 128), (3, 72, 24, 72)]


def generator_for(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_int4(in_features, out_features, group_size, generator, scale_dtype=torch.float16):
    """Random 4-bit values packed low nibble first along the input (QuantLinear's layout), with the float64
    weight they stand for."""
    groups = -(-in_features // group_size)
    q = torch.randint(0, 16, (out_features, in_features), generator=generator)
    zeros = torch.randint(0, 16, (out_features, groups), generator=generator).to(scale_dtype)
    scales = (torch.rand(out_features, groups, generator=generator, dtype=torch.float64) * 0.02 + 0.005)
    scales = scales.to(scale_dtype)
    words = q.view(out_features, in_features // 8, 8)
    packed = torch.zeros(out_features, in_features // 8, dtype=torch.int64)
    for j in range(8):
        packed |= words[..., j] << (4 * j)
    qweight = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    group = torch.arange(in_features) // group_size
    weight64 = (q.double() - zeros.double()[:, group]) * scales.double()[:, group]
    return qweight, scales, zeros, weight64


def assert_close_to_oracle(actual, expected, dtype):
    error = (actual.double().cpu() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= RTOL[dtype] * scale, f"max error {error:.3g} vs |oracle| {scale:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,in_features,out_features,group_size", CASES)
def test_int4_gemm_matches_float64(request, rows, in_features, out_features, group_size, dtype):
    gen = generator_for(request)
    qweight, scales, zeros, weight64 = random_int4(in_features, out_features, group_size, gen)
    x = torch.randn(rows, in_features, generator=gen, dtype=torch.float64) * 3
    x_in = x.to(dtype)
    expected = x_in.double() @ weight64.t()
    args = [t.to(DEVICE) for t in (qweight, scales, zeros)]
    out = int4_gemm(x_in.to(DEVICE), *args, group_size)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert_close_to_oracle(out, expected, dtype)
    assert_close_to_oracle(int4_gemm_reference(x_in.to(DEVICE), *args, group_size), expected, dtype)


def test_int4_gemm_reads_strided_rows_and_bf16_scales(request):
    gen = generator_for(request)
    qweight, scales, zeros, weight64 = random_int4(64, 48, 32, gen, scale_dtype=torch.bfloat16)
    wide = torch.randn(9, 100, generator=gen)
    x = wide[:, 10:74]  # rows 100 apart
    out = int4_gemm(x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), 32)
    assert_close_to_oracle(out, x.double() @ weight64.t(), torch.float32)


def test_int4_gemm_rejects_bad_arguments():
    qweight = torch.zeros(16, 8, dtype=torch.int32)
    scales = zeros = torch.ones(16, 2, dtype=torch.float16)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"qweight must be int32 \[out, 64/8\]"):
        int4_gemm(x, qweight[:, :4], scales, zeros, 32)
    with pytest.raises(ValueError, match=r"scales must be \[16, 2\]"):
        int4_gemm(x, qweight, scales[:, :1], zeros, 32)
    with pytest.raises(ValueError, match=r"group_size must be a positive multiple of 8, got 12"):
        int4_gemm(x, qweight, scales, zeros, 12)
    with pytest.raises(ValueError, match=r"x must be float32, float16 or bfloat16"):
        int4_gemm(x.double(), qweight, scales, zeros, 32)


@pytest.mark.parametrize("act_order", [False, True])
def test_quant_linear_triton_backend_equals_reference(request, monkeypatch, act_order):
    """QuantLinear through the Triton GEMM (what CUDA prefill uses) = its pure-torch path, act-order included."""
    from llmdrop_rt.quant.formats import Int4Weights
    from llmdrop_rt.quant.linear import QuantLinear

    gen = generator_for(request)
    out_features, in_features, group = 40, 96, 32
    g_idx = torch.arange(in_features) // group
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    weights = Int4Weights(torch.randint(0, 16, (out_features, in_features), generator=gen).to(torch.uint8),
                          torch.randint(0, 16, (3, out_features), generator=gen).to(torch.int16),
                          (torch.rand(3, out_features, generator=gen) * 0.02 + 0.005).half(), g_idx)
    layer = QuantLinear.from_int4(weights, group, bias=torch.randn(out_features, generator=gen)).to(DEVICE)
    x = torch.randn(2, 13, in_features, generator=gen).to(DEVICE)
    monkeypatch.setenv("LLMDROP_RT_INT4_BACKEND", "reference")
    expected = layer(x)
    monkeypatch.setenv("LLMDROP_RT_INT4_BACKEND", "triton")
    assert layer.backend_for(x) == "triton"
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)
