"""Fused RMSNorm + gate/up + SwiGLU kernel against a float64 oracle built from the unfolded weights.

Covers both kernels: decode (<= DECODE_MAX_ROWS rows, GEMV) and prefill (tiled tl.dot).
Runs on CUDA when present, otherwise the Triton interpreter on CPU (see conftest.py).
"""
import zlib

import pytest
import torch

from llmdrop_rt.kernels.norm_mlp import DECODE_MAX_ROWS, norm_swiglu, norm_swiglu_reference, prepare_norm_mlp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: folded weights, x and the output each rounded once; Triton's interpreter truncates
# fp32 -> bf16 casts instead of rounding, which doubles that worst case on CPU.
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2 if DEVICE == "cuda" else 2e-2}
EPS = 1e-5

# (rows, hidden, intermediate, dtype): rows either side of the decode/prefill switch, odd sizes.
CASES = [
    *[(rows, 100, 96, dtype) for rows in (1, 3, DECODE_MAX_ROWS, DECODE_MAX_ROWS + 1, 37)
      for dtype in (torch.float32, torch.float16, torch.bfloat16)],
    # SmolLM2's sizes for decode; a narrower intermediate keeps the interpreter's slow tl.dot quick.
    *[(rows, 576, intermediate, dtype) for rows, intermediate in ((1, 1536), (37, 416))
      for dtype in (torch.float32, torch.bfloat16)],
    (5, 1000, 272, torch.float16),
    (40, 1000, 272, torch.float32),
    (130, 100, 272, torch.float32),  # several row tiles, the last tile group partly filled
]


def generator_for(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_mlp(hidden, intermediate, dtype, generator):
    """Norm weight around 1 and gate/up weights at the usual 1/sqrt(hidden) scale."""
    def draw(*shape):
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    norm_weight = (1.0 + 0.5 * draw(hidden)).to(dtype).to(DEVICE)
    gate = (draw(intermediate, hidden) / hidden ** 0.5).to(dtype).to(DEVICE)
    up = (draw(intermediate, hidden) / hidden ** 0.5).to(dtype).to(DEVICE)
    return norm_weight, gate, up


def random_rows(shape, dtype, generator) -> torch.Tensor:
    """Non-zero values whose scale varies by orders of magnitude from row to row."""
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    row_scale = torch.exp(torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(-3, 3, generator=generator))
    return (values * row_scale + 1e-3 * row_scale).to(dtype).to(DEVICE)


def oracle_norm_swiglu(x, norm_weight, gate, up, eps):
    x64 = x.double()
    h = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    return torch.nn.functional.silu(h @ gate.double().t()) * (h @ up.double().t())


def assert_close_to_oracle(actual, expected, dtype):
    assert torch.isfinite(actual).all(), "output has non-finite elements (unwritten or overflowed)"
    rtol = RTOL[dtype]
    # gate/up are sums over the hidden size and may cancel to near zero, so the absolute floor
    # scales with the row's largest output.
    row_scale = expected.abs().amax(-1, keepdim=True)
    error = (actual.double() - expected).abs()
    worst = (error / (rtol * expected.abs() + rtol * row_scale)).max().item()
    assert worst <= 1.0, f"error exceeds tolerance by a factor {worst:.3g} (rtol {rtol})"


@pytest.mark.parametrize("rows,hidden,intermediate,dtype", CASES, ids=str)
def test_norm_swiglu_matches_float64(request, rows, hidden, intermediate, dtype):
    generator = generator_for(request)
    norm_weight, gate, up = random_mlp(hidden, intermediate, dtype, generator)
    x = random_rows((rows, hidden), dtype, generator)
    prepared = prepare_norm_mlp(norm_weight, gate, up)
    out = torch.full((rows, intermediate), float("nan"), dtype=dtype, device=DEVICE)

    result = norm_swiglu(x, prepared, EPS, out=out)

    assert result is out
    assert_close_to_oracle(out, oracle_norm_swiglu(x, norm_weight, gate, up, EPS), dtype)


@pytest.mark.parametrize("leading", [(2, 5), (3, 7)], ids=["decode", "prefill"])
def test_norm_swiglu_keeps_leading_shape_and_reads_strided_rows(request, leading):
    generator = generator_for(request)
    norm_weight, gate, up = random_mlp(100, 96, torch.float32, generator)
    padded = random_rows(leading + (128,), torch.float32, generator)
    x = padded[..., :100]  # rows 128 apart

    act = norm_swiglu(x, prepare_norm_mlp(norm_weight, gate, up), EPS)

    assert act.shape == leading + (96,)
    assert_close_to_oracle(act, oracle_norm_swiglu(x, norm_weight, gate, up, EPS), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 37])
def test_torch_reference_matches_float64(request, rows, dtype):
    generator = generator_for(request)
    norm_weight, gate, up = random_mlp(576, 1536, dtype, generator)
    x = random_rows((rows, 576), dtype, generator)

    act = norm_swiglu_reference(x, prepare_norm_mlp(norm_weight, gate, up), EPS)

    assert act.dtype == dtype
    assert_close_to_oracle(act, oracle_norm_swiglu(x, norm_weight, gate, up, EPS), dtype)


def test_prepare_folds_norm_weight_into_gate_and_up(request):
    generator = generator_for(request)
    norm_weight, gate, up = random_mlp(100, 96, torch.float32, generator)
    prepared = prepare_norm_mlp(norm_weight, gate, up)
    assert prepared.gate_up.shape == (2, 96, 100) and prepared.gate_up.is_contiguous()
    torch.testing.assert_close(prepared.gate_up[0], gate * norm_weight, rtol=0, atol=0)
    torch.testing.assert_close(prepared.gate_up[1], up * norm_weight, rtol=0, atol=0)


def test_bad_arguments_are_named():
    norm_weight = torch.ones(100, device=DEVICE)
    gate = torch.ones(96, 100, device=DEVICE)
    with pytest.raises(ValueError, match=r"up_weight shape \(96, 99\)"):
        prepare_norm_mlp(norm_weight, gate, torch.ones(96, 99, device=DEVICE))
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(100,\)"):
        prepare_norm_mlp(torch.ones(99, device=DEVICE), gate, gate)
    prepared = prepare_norm_mlp(norm_weight, gate, gate)
    with pytest.raises(ValueError, match="hidden size 100"):
        norm_swiglu(torch.ones(2, 99, device=DEVICE), prepared, EPS)
    with pytest.raises(ValueError, match="x dtype torch.bfloat16 differs"):
        norm_swiglu(torch.ones(2, 100, device=DEVICE, dtype=torch.bfloat16), prepared, EPS)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        norm_swiglu(torch.ones(2, 100, device=DEVICE), prepared, EPS, out=torch.empty(2, 95, device=DEVICE))
