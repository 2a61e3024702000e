"""llmdrop_rt.quant.cpu_linear and its compiled kernels (llmdrop_rt._cpu_gemv) against float64 references.

Every kernel result is compared with x @ W.T computed in float64 from the SAME stored weights (dequantize is exact
in float64), so the only allowed deviation is the kernels' own arithmetic: fp32 rounding, and for the block formats
the quantisation of x (int8 for the 4-bit formats, int16 for q8_0), which the tolerance bounds from x itself (see
`tolerance`). The quantizers are checked byte for byte against gguf's reference implementation; the kernels read
the block formats row-interleaved (`interleave`), which the layout tests pin down.
"""
from __future__ import annotations

import os
import random
import zlib

import gguf
import numpy as np
import pytest
import torch

from llmdrop_rt.quant import cpu_linear
from llmdrop_rt.quant.cpu_linear import (
    BLOCK,
    BLOCK_BYTES,
    FORMATS,
    CpuEmbedding,
    CpuLinear,
    deinterleave,
    deinterleaved_rows,
    dequantize,
    interleave,
    quantize,
)

ops = cpu_linear.ops
requires_ext = pytest.mark.skipif(
    ops is None, reason="llmdrop_rt._cpu_gemv is not built (python setup.py build_ext --inplace with torch present)")

BLOCK_FORMATS = tuple(BLOCK_BYTES)
GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "q4_1": gguf.GGMLQuantizationType.Q4_1}
# (out, in): in a multiple of 32 for every format, plus odd in for the dense formats.
SHAPES = [(37, 64), (59, 64), (77, 96), (576, 1536)]  # 59: tiles of 4 and of 3 streams (gemv)
DENSE_ODD_SHAPES = [(37, 77), (5, 13)]
ROWS = [1, 3, 8, 33]  # 33: more than the GEMV takes (tiles + GEMM)
# Fresh inputs every run; LLMDROP_TEST_SEED=<the seed a failing test printed> repeats them.
SESSION_SEED = int(os.environ.get("LLMDROP_TEST_SEED") or random.randrange(2**31))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator of the session's seed mixed with the test's id, so each test draws its own inputs."""
    print(f"LLMDROP_TEST_SEED={SESSION_SEED}")
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ SESSION_SEED)


@pytest.fixture(params=[512, 256, 0], ids=["avx512", "avx2", "portable"])
def simd(request):
    """The kernels with the vector width capped at AVX-512 VNNI, at AVX2 and at none (portable loops)."""
    assert ops is not None
    width = ops.set_max_simd_bits(request.param)
    if width < request.param and request.param == 512:
        ops.set_max_simd_bits(512)
        pytest.skip("this CPU has no AVX-512 VNNI (its AVX2 kernels run under the avx2 id)")
    assert width <= request.param
    yield width
    ops.set_max_simd_bits(512)


def random_weight(out_features: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5


def integer_part(stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """|d * q| per weight (float64), q as the kernels multiply it with the quantised x: q8_0's int8, the raw
    nibble of q4_0 / q4_1 (their offset, -8 d or m, is summed separately)."""
    if fmt == "q8_0":
        return dequantize(stored, fmt).abs()
    blocks = stored.reshape(stored.shape[0], -1, BLOCK_BYTES[fmt])
    d = blocks[..., :2].contiguous().view(torch.float16).to(torch.float64)
    qs = blocks[..., -BLOCK // 2:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1).to(torch.float64)
    return (d * q).abs().reshape(stored.shape[0], -1)


def tolerance(x: torch.Tensor, stored: torch.Tensor, fmt: str) -> torch.Tensor:
    """Elementwise bound [rows, out] on |kernel - exact|. fp32 rounding: 1e-5 of sum |w x| (for the block
    formats of sum (|d q| + |w|) |x|, which covers the separately summed offset term). Block formats multiply W
    with x quantised per block of 32, to int8 for the 4-bit formats and to int16 for q8_0, each x off by at most
    half a step (max|x over its block| / 254, or / 65534), which moves y[m, o] by at most sum over blocks of
    sum|w| * that step."""
    w = dequantize(stored, fmt)
    x64 = x.to(torch.float64)
    if fmt not in BLOCK_FORMATS:
        return 1e-5 * (x64.abs() @ w.abs().T) + 1e-30
    bound = 1e-5 * (x64.abs() @ (integer_part(stored, fmt) + w.abs()).T) + 1e-30
    steps = 65534 if fmt == "q8_0" else 254
    step = x64.reshape(x.shape[0], -1, BLOCK).abs().amax(-1) / steps * 1.001
    return bound + step @ w.abs().reshape(w.shape[0], -1, BLOCK).sum(-1).T


def reference(x: torch.Tensor, stored: torch.Tensor, fmt: str, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.float64) @ dequantize(stored, fmt).T
    return y if bias is None else y + bias.to(torch.float64)


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, stored: torch.Tensor, fmt: str,
                              bias: torch.Tensor | None = None):
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], stored.shape[0])
    exact = reference(x, stored, fmt, bias)
    error = (y.to(torch.float64) - exact).abs()
    bound = tolerance(x, stored, fmt)
    worst = (error / bound).max().item()
    assert torch.isfinite(y).all() and worst <= 1.0, f"{fmt}: error {worst:.2f}x the bound"
    # And the headline figure, the relative error of the whole output (typically 2e-5 to 7e-5 for q8_0's int16 x,
    # 3e-3 to 6e-3 for the int8 x of the 4-bit formats).
    relative = (error.norm() / exact.norm()).item()
    assert relative < {"q8_0": 1e-3, "q4_0": 1e-2, "q4_1": 1e-2}.get(fmt, 1e-6), relative


def shapes_for(fmt: str):
    return SHAPES + (DENSE_ODD_SHAPES if fmt not in BLOCK_FORMATS else [])


# --------------------------------------------------------------------------------------------------
# Storage formats
# --------------------------------------------------------------------------------------------------
def edge_case_blocks() -> torch.Tensor:
    """Rows of one block each that exercise the quantizers' corners: zeros, a constant, ties of the largest
    magnitude with both signs, values landing exactly on rounding midpoints, and huge/tiny magnitudes."""
    rows = [torch.zeros(BLOCK), torch.full((BLOCK,), 0.75), torch.linspace(-4, 4, BLOCK),
            torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 63.5, -63.5] + [1.0] * (BLOCK - 7)),
            torch.tensor([-4.0, 4.0] + [0.5 * k for k in range(BLOCK - 2)]),
            torch.linspace(-3e4, 6e4, BLOCK), torch.linspace(-1e-6, 2e-6, BLOCK)]
    return torch.stack(rows)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_quantize_matches_gguf_bytes(fmt, gen):
    for weight in (random_weight(77, 96, gen), random_weight(3, 4096, gen) * 30, edge_case_blocks()):
        stored = quantize(weight, fmt)
        expected = gguf.quants.quantize(weight.numpy(), GGUF_TYPES[fmt])
        assert stored.dtype == torch.uint8 and stored.shape == expected.shape
        assert torch.equal(stored, torch.from_numpy(expected)), f"{fmt}: bytes differ from gguf.quants.quantize"


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_dequantize_matches_gguf(fmt, gen):
    stored = quantize(random_weight(37, 128, gen), fmt)
    expected = gguf.quants.dequantize(stored.numpy(), GGUF_TYPES[fmt])
    # Every weight of these formats is exact in float64; gguf's float32 result is that value rounded once.
    assert np.array_equal(dequantize(stored, fmt, torch.float32).numpy(), expected)
    assert torch.equal(dequantize(stored, fmt).to(torch.float32), dequantize(stored, fmt, torch.float32))


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_gguf_tensor_is_a_stored_weight(fmt, gen, tmp_path):
    """A tensor read from a GGUF file is used as it is: its bytes, one row per output feature."""
    weight = random_weight(8, 64, gen)
    writer = gguf.GGUFWriter(tmp_path / "w.gguf", "llama")
    quantized = gguf.quants.quantize(weight.numpy(), GGUF_TYPES[fmt])
    writer.add_tensor("w", quantized, raw_shape=quantized.shape, raw_dtype=GGUF_TYPES[fmt])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(tmp_path / "w.gguf").tensors
    layer = CpuLinear(torch.from_numpy(np.array(tensor.data)), fmt)
    assert (layer.out_features, layer.in_features) == (8, 64)
    x = torch.randn(2, 64, generator=gen)
    assert_close_to_reference(layer(x), x, quantize(weight, fmt), fmt)


def test_nibble_layout():
    """Byte j of qs holds element j (low nibble) and element j + 16 (high nibble); value = q - 8 for q4_0."""
    q = torch.arange(BLOCK) % 16
    stored = torch.cat([torch.tensor([1.0]).half().view(torch.uint8),
                        (q[:16] | (q[16:] << 4)).to(torch.uint8)]).reshape(1, -1)
    assert torch.equal(dequantize(stored, "q4_0")[0], (q - 8).to(torch.float64))


@pytest.mark.parametrize("out_features", [8, 37, 77])
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_interleave_round_trips(fmt, out_features, gen):
    stored = quantize(random_weight(out_features, 96, gen), fmt)
    held = interleave(stored, fmt)
    assert held.shape == stored.shape and held.dtype == torch.uint8
    assert torch.equal(deinterleave(held, fmt), stored)
    full = out_features // 8 * 8
    assert torch.equal(held[full:], stored[full:])  # the rows after the last full group stay GGUF rows
    index = torch.randint(out_features, (13,), generator=gen)
    assert torch.equal(deinterleaved_rows(held, fmt, index), stored[index])


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_interleaved_layout(fmt, gen):
    """Group block b of rows 0-7 (8 * block bytes): their 8 d, for q4_1 their 8 m, then lanes of L value bytes
    (L = 4 for the 4-bit formats, 2 for q8_0): lane k is value bytes k*L .. k*L+L-1 of row 0, row 1, ... row 7."""
    nbytes, lane = BLOCK_BYTES[fmt], {"q8_0": 2, "q4_0": 4, "q4_1": 4}[fmt]
    scales = 4 if fmt == "q4_1" else 2
    stored = torch.randint(256, (8, 3 * nbytes), generator=gen, dtype=torch.uint8)  # any bytes: a layout test
    held = interleave(stored, fmt).reshape(3, 8 * nbytes)
    for b in range(3):
        for r in range(8):
            block = stored[r, b * nbytes:(b + 1) * nbytes]
            assert torch.equal(held[b, 2 * r:2 * r + 2], block[:2])
            if fmt == "q4_1":
                assert torch.equal(held[b, 16 + 2 * r:18 + 2 * r], block[2:4])
            lanes = held[b, 8 * scales:]
            for k in range((nbytes - scales) // lane):
                assert torch.equal(lanes[(8 * k + r) * lane:(8 * k + r + 1) * lane], block[scales + k * lane:][:lane])


@pytest.mark.parametrize("extension", [True, False], ids=["rows-op", "python"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows_and_tied_head(fmt, extension, gen, monkeypatch):
    if not extension:
        monkeypatch.setattr(cpu_linear, "ops", None)
    stored = quantize(random_weight(45, 64, gen), fmt)  # 5 interleaved groups of 8 rows and 5 plain rows
    embed = CpuEmbedding(stored, fmt)
    tokens = torch.randint(45, (3, 7), generator=gen)
    assert torch.equal(embed(tokens), dequantize(stored[tokens.reshape(-1)], fmt, torch.float32).reshape(3, 7, 64))
    head = embed.tied_head()
    assert head.weight.data_ptr() == embed.weight.data_ptr() and torch.equal(head.stored(), stored)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_bytes_and_in_features(fmt, gen):
    layer = CpuLinear.from_float(random_weight(40, 64, gen), fmt, bias=torch.zeros(40))
    per_row = {"f32": 64 * 4, "f16": 64 * 2, "bf16": 64 * 2, "q8_0": 2 * 34, "q4_0": 2 * 18, "q4_1": 2 * 20}[fmt]
    assert layer.in_features == 64 and layer.out_features == 40
    assert layer.weight_bytes() == 40 * per_row + 40 * 4


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@requires_ext
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_matches_float64_reference(fmt, rows, simd, gen):
    op = getattr(ops, f"gemv_{fmt}")
    for index, (out_features, in_features) in enumerate(shapes_for(fmt)):
        stored = quantize(random_weight(out_features, in_features, gen), fmt)
        x = torch.randn(rows, in_features, generator=gen)
        bias = torch.randn(out_features, generator=gen) if index % 2 else None
        assert_close_to_reference(op(x, interleave(stored, fmt), bias), x, stored, fmt, bias)


@requires_ext
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("fmt", FORMATS)
def test_out_variant_writes_every_element(fmt, rows, simd, gen):
    stored = quantize(random_weight(77, 96, gen), fmt)
    x, bias = torch.randn(rows, 96, generator=gen), torch.randn(77, generator=gen)
    y = torch.full((rows, 77), float("nan"))
    returned = getattr(ops, f"gemv_{fmt}").out(x, interleave(stored, fmt), bias, out=y)
    assert returned.data_ptr() == y.data_ptr()
    assert_close_to_reference(y, x, stored, fmt, bias)


@requires_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_x(fmt, simd, gen):
    stored = quantize(random_weight(37, 64, gen), fmt)
    for x in (torch.randn(64, 3, generator=gen).T, torch.randn(3, 128, generator=gen)[:, ::2]):
        assert not x.is_contiguous()
        assert_close_to_reference(getattr(ops, f"gemv_{fmt}")(x, interleave(stored, fmt)), x, stored, fmt)


@requires_ext
@pytest.mark.parametrize("fmt", FORMATS)
def test_threads_split_rows_without_changing_results(fmt, gen):
    """Each output is computed by one thread in one fixed order, whatever the thread count (an odd row count
    puts a split inside what two threads would share)."""
    stored = interleave(quantize(random_weight(575, 1536, gen), fmt), fmt)
    x = torch.randn(3, 1536, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = getattr(ops, f"gemv_{fmt}")(x, stored)
        torch.set_num_threads(2)
        assert torch.equal(getattr(ops, f"gemv_{fmt}")(x, stored), single)
    finally:
        torch.set_num_threads(threads)


@requires_ext
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_many_rows_on_one_and_two_threads(fmt, threads, simd, gen):
    """Prefill-sized calls take the integer kernels or (q8_0 on one thread without AVX-512 VNNI) dequantised tiles +
    GEMM."""
    stored = quantize(random_weight(77, 96, gen), fmt)
    x, bias = torch.randn(45, 96, generator=gen), torch.randn(77, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = getattr(ops, f"gemv_{fmt}")(x, interleave(stored, fmt), bias)
    finally:
        torch.set_num_threads(before)
    assert_close_to_reference(y, x, stored, fmt, bias)


@requires_ext
@pytest.mark.parametrize("rows", [1, 33])
@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_in_x_reaches_every_output_of_its_row(fmt, rows, simd, gen):
    stored = quantize(random_weight(37, 64, gen), fmt)
    x = torch.randn(rows, 64, generator=gen)
    x[0, 5] = float("nan")
    y = getattr(ops, f"gemv_{fmt}")(x, interleave(stored, fmt))
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()


@requires_ext
def test_zero_rows_and_zero_blocks():
    stored = quantize(torch.zeros(8, 64), "q4_1")
    assert ops.gemv_q4_1(torch.empty(0, 64), stored).shape == (0, 8)
    assert torch.equal(ops.gemv_q4_1(torch.randn(2, 64), stored), torch.zeros(2, 8))


@requires_ext
@pytest.mark.parametrize("call, message", [
    (lambda: ops.gemv_f32(torch.randn(2, 8, dtype=torch.float64), torch.randn(4, 8)), "x must be float32"),
    (lambda: ops.gemv_f32(torch.randn(8), torch.randn(4, 8)), r"x must be float32 \[rows, in\]"),
    (lambda: ops.gemv_f16(torch.randn(2, 8), torch.randn(4, 8)), "weight must be Half"),
    (lambda: ops.gemv_bf16(torch.randn(2, 8), torch.randn(4, 7).bfloat16()), "weight has 7 input features, x has 8"),
    (lambda: ops.gemv_f32(torch.randn(2, 8), torch.randn(8, 4).T), "weight must be a contiguous 2-D tensor"),
    (lambda: ops.gemv_q4_0(torch.randn(2, 48), torch.zeros(4, 27, dtype=torch.uint8)),
     "in \\(48\\) must be a multiple of the block size 32"),
    (lambda: ops.gemv_q4_0(torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.int8)), "weight must be uint8 blocks"),
    (lambda: ops.gemv_q8_0(torch.randn(2, 64), torch.zeros(4, 36, dtype=torch.uint8)),
     "weight has 36 bytes per row, x has 64 features \\(expected 68 bytes: 2 blocks of 34\\)"),
    (lambda: ops.gemv_q4_1(torch.randn(2, 64), torch.zeros(4, 40, dtype=torch.uint8), torch.zeros(5)),
     r"bias must be float32 \[4\]"),
    (lambda: ops.gemv_q4_1(torch.randn(2, 64), torch.zeros(4, 40, dtype=torch.uint8), torch.zeros(4).half()),
     r"bias must be float32 \[4\]"),
    (lambda: ops.gemv_q4_1.out(torch.randn(2, 64), torch.zeros(4, 40, dtype=torch.uint8), None,
                               out=torch.empty(4, 2)), r"out must be a contiguous float32 \[2, 4\]"),
    (lambda: ops.rows_q4_0(torch.zeros(4, 36, dtype=torch.uint8), torch.tensor([1, 4])),
     "rows_q4_0: index 4 outside the weight's 4 rows"),
    (lambda: ops.rows_f16(torch.zeros(4, 8), torch.tensor([0])), "rows_f16: weight must be Half"),
    (lambda: ops.rows_q4_1(torch.zeros(4, 30, dtype=torch.uint8), torch.tensor([0])),
     "rows_q4_1: weight has 30 bytes per row, not a whole number of 20-byte blocks"),
    (lambda: ops.rows_q8_0(torch.zeros(4, 34, dtype=torch.uint8), torch.tensor([0], dtype=torch.int32)),
     r"rows_q8_0: index must be int64 \[n\]"),
], ids=["x-dtype", "x-1d", "weight-dtype", "in-mismatch", "weight-strides", "in-not-blocks", "blocks-dtype",
        "row-bytes", "bias-shape", "bias-dtype", "out-shape", "rows-index-range", "rows-dtype", "rows-row-bytes",
        "rows-index-dtype"])
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gemm", ["onednn", "aten"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_linear_forward(fmt, gemm, gen, monkeypatch):
    """Many rows of a dense format go to oneDNN's GEMM where torch has it, else to F.linear (f32) or the op's
    tiles: each way within the kernels' bound of the float64 reference."""
    if gemm == "aten":
        monkeypatch.setattr(cpu_linear, "onednn_linear", None)
    elif cpu_linear.onednn_linear is None:
        pytest.skip("this torch has no oneDNN linear op")
    weight, bias = random_weight(77, 96, gen), torch.randn(77, generator=gen)
    layer = CpuLinear.from_float(weight, fmt, bias)
    assert layer.path == ("reference" if ops is None else "kernel")
    for lead in [(1,), (2, 3), (5, 9)]:  # 1, 6 and 45 rows: GEMV and tiles
        x = torch.randn(*lead, 96, generator=gen)
        y = layer(x)
        assert y.shape == (*lead, 77)
        assert_close_to_reference(y.reshape(-1, 77), x.reshape(-1, 96), layer.stored(), fmt, bias)


@pytest.mark.parametrize("fmt", FORMATS)
def test_cpu_linear_without_extension_uses_reference(fmt, gen, monkeypatch):
    monkeypatch.setattr(cpu_linear, "ops", None)
    layer = CpuLinear.from_float(random_weight(37, 64, gen), fmt)
    assert layer.path == "reference"
    x = torch.randn(3, 64, generator=gen)
    assert_close_to_reference(layer(x), x, layer.stored(), fmt)
    with pytest.raises(RuntimeError, match="not built"):
        CpuLinear(layer.stored(), fmt, path="kernel")


def test_cpu_linear_torch_path_is_f32_only(gen):
    weight = random_weight(37, 64, gen)
    layer = CpuLinear.from_float(weight, "f32", path="torch")
    x = torch.randn(2, 64, generator=gen)
    assert layer.path == "torch" and torch.equal(layer(x), torch.nn.functional.linear(x, weight))
    with pytest.raises(ValueError, match="needs an f32 weight"):
        CpuLinear.from_float(weight, "bf16", path="torch")
    with pytest.raises(ValueError, match="unknown weight format"):
        CpuLinear.from_float(weight, "q5_0")


def test_extension_builds_where_required():
    if not os.environ.get("LLMDROP_RT_REQUIRE_EXT"):
        pytest.skip("LLMDROP_RT_REQUIRE_EXT is not set")
    assert ops is not None, "LLMDROP_RT_REQUIRE_EXT is set but llmdrop_rt._cpu_gemv does not import"
    assert ops.simd_width() in (0, 256, 512)


@pytest.mark.parametrize("numel", [1, 3, 127, 128 * 9 + 5, 100_003])
def test_read_sum_reads_every_element_once(numel, simd, gen):
    data = torch.rand(numel, generator=gen)
    data[-1] = 1000.0  # the last element lies past the stretches
    expected = data.double().sum().item()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert ops.read_sum(data) == pytest.approx(expected, rel=1e-5)
    finally:
        torch.set_num_threads(before)


def test_read_sum_refuses_other_tensors():
    with pytest.raises(RuntimeError, match="read_sum: data must be a contiguous float32"):
        ops.read_sum(torch.ones(8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="read_sum: data must be a contiguous float32"):
        ops.read_sum(torch.ones(8, 2).t())
