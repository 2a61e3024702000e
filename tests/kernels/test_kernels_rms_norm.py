"""RMSNorm and fused residual-add + RMSNorm kernels against a float64 oracle (and HF's LlamaRMSNorm).

Runs on CUDA when present, otherwise the Triton interpreter on CPU (see conftest.py).
"""
import zlib

import pytest
import torch

from llmdrop_rt.kernels.rms_norm import add_rms_norm_, add_rms_norm_reference, rms_norm, rms_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance per I/O dtype: a few fp32 roundings, or two roundings to a 16-bit format.
# Triton's interpreter truncates fp32 -> bf16 casts instead of rounding to nearest (a GPU rounds),
# which doubles the worst case of each bf16 rounding there.
BF16_RTOL = 1e-2 if DEVICE == "cuda" else 2e-2
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: BF16_RTOL}
SHAPES = [(1, 100), (37, 576), (2, 5, 1000), (3, 5120), (1, 8192)]
EPS = 1e-6


def generator_for(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible on rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def random_rows(shape, dtype, generator) -> torch.Tensor:
    """Non-zero values whose scale varies by orders of magnitude from row to row."""
    values = torch.randn(shape, generator=generator, dtype=torch.float64)
    row_scale = torch.exp(torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(-4, 4, generator=generator))
    return (values * row_scale + 1e-3 * row_scale).to(dtype).to(DEVICE)


def random_weight(hidden, dtype, generator) -> torch.Tensor:
    return (1.0 + 0.5 * torch.randn(hidden, generator=generator, dtype=torch.float64)).to(dtype).to(DEVICE)


def oracle_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all(), "output has non-finite elements (unwritten or overflowed)"
    rtol = RTOL[dtype]
    # Rows differ in scale by orders of magnitude, so the absolute floor is per row.
    row_scale = expected.abs().amax(-1, keepdim=True)
    error = (actual.double() - expected).abs()
    allowed = rtol * expected.abs() + 0.1 * rtol * row_scale
    worst = (error / allowed).max().item()
    assert worst <= 1.0, f"error exceeds tolerance by a factor {worst:.3g} (rtol {rtol})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_float64(request, shape, dtype):
    generator = generator_for(request)
    x = random_rows(shape, dtype, generator)
    weight = random_weight(shape[-1], dtype, generator)
    out = torch.full_like(x, float("nan"))

    result = rms_norm(x, weight, EPS, out=out)

    assert result is out and result.dtype == dtype and result.shape == x.shape
    assert_close_to_oracle(out, oracle_rms_norm(x, weight, EPS), dtype)
    assert torch.equal(rms_norm(x, weight, EPS), out), "allocating call differs from out= call"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_updates_residual_and_normalises(request, shape, dtype):
    generator = generator_for(request)
    residual = random_rows(shape, dtype, generator)
    delta = random_rows(shape, dtype, generator)
    weight = random_weight(shape[-1], dtype, generator)
    expected_residual = residual.double() + delta.double()
    out = torch.full_like(residual, float("nan"))

    result = add_rms_norm_(residual, delta, weight, EPS, out=out)

    assert result is out
    assert_close_to_oracle(residual, expected_residual, dtype)
    # The norm is of the residual as stored (rounded to dtype), exactly as torch's `+=` leaves it.
    assert_close_to_oracle(out, oracle_rms_norm(residual, weight, EPS), dtype)
    assert_close_to_oracle(out, oracle_rms_norm(expected_residual, weight, EPS), dtype)


def test_rms_norm_reads_strided_input(request):
    generator = generator_for(request)
    wide = random_rows((6, 2 * 576), torch.float32, generator)
    x = wide[:, ::2]  # non-unit stride along hidden
    weight = random_weight(576, torch.float32, generator)
    assert_close_to_oracle(rms_norm(x, weight, EPS), oracle_rms_norm(x, weight, EPS), torch.float32)


def test_add_rms_norm_updates_a_row_strided_residual_in_place(request):
    generator = generator_for(request)
    buffer = random_rows((5, 2 * 100), torch.float32, generator)
    residual = buffer[:, :100]  # rows are 200 apart: viewable in place, not contiguous
    untouched = buffer[:, 100:].clone()
    delta = random_rows((5, 100), torch.float32, generator)
    weight = random_weight(100, torch.float32, generator)
    expected_residual = residual.double() + delta.double()

    out = add_rms_norm_(residual, delta, weight, EPS)

    assert_close_to_oracle(buffer[:, :100], expected_residual, torch.float32)
    assert torch.equal(buffer[:, 100:], untouched), "kernel wrote outside the residual view"
    assert_close_to_oracle(out, oracle_rms_norm(expected_residual, weight, EPS), torch.float32)


def test_add_rms_norm_rejects_a_residual_it_cannot_update_in_place():
    residual = torch.ones(100, 4, device=DEVICE).t()  # hidden stride 4
    with pytest.raises(ValueError, match="residual must have unit stride"):
        add_rms_norm_(residual, torch.ones(4, 100, device=DEVICE), torch.ones(100, device=DEVICE), EPS)


def test_bad_weight_is_named():
    x = torch.ones(2, 100, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must have shape \(100,\)"):
        rms_norm(x, torch.ones(99, device=DEVICE), EPS)
    with pytest.raises(ValueError, match="weight dtype"):
        rms_norm(x, torch.ones(100, device=DEVICE, dtype=torch.bfloat16), EPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_references_match_float64(request, dtype):
    generator = generator_for(request)
    residual = random_rows((7, 576), dtype, generator)
    delta = random_rows((7, 576), dtype, generator)
    weight = random_weight(576, dtype, generator)
    assert_close_to_oracle(rms_norm_reference(residual, weight, EPS), oracle_rms_norm(residual, weight, EPS), dtype)

    expected_residual = residual.double() + delta.double()
    out = add_rms_norm_reference(residual, delta, weight, EPS)
    assert_close_to_oracle(residual, expected_residual, dtype)
    assert_close_to_oracle(out, oracle_rms_norm(expected_residual, weight, EPS), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cast_order_matches_hf_llama_rms_norm(request, dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    generator = generator_for(request)
    x = random_rows((9, 576), dtype, generator)
    hf_norm = llama.LlamaRMSNorm(576, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        hf_norm.weight.copy_(random_weight(576, dtype, generator))
        expected = hf_norm(x)
    weight = hf_norm.weight.detach()
    # The torch reference is the same sequence of torch ops: bit-identical.
    assert torch.equal(rms_norm_reference(x, weight, EPS), expected)
    # The kernel sums in a different order, so allow one unit in the last place of the I/O dtype.
    torch.testing.assert_close(rms_norm(x, weight, EPS), expected)
