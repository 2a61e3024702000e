"""4-bit AWQ / GPTQ: our unpacking, reference dequantizer and C++ kernel against independent packers.

Oracles: AutoAWQ's `WQLinear_GEMM.from_linear` packs AWQ "gemm"; auto-gptq's pure-torch
`QuantLinear.pack` packs GPTQ v1 (zero - 1). GPTQ v2 is derived from those v1 tensors by the documented
zero offset (each stored zero nibble + 1, i.e. + 0x11111111 per word when no nibble overflows). Both
packaged `__init__`s import things that break with transformers 5, so the packer submodules are loaded
under a bare parent package.
"""
import importlib
import json

import pytest
import torch
from int4_packers import awq_checkpoint, gptq_v1_checkpoint, import_bypassing_package_init

from llmdrop_rt.quant import formats, linear
from llmdrop_rt.quant.formats import Int4Weights, QuantConfig, dequantize_reference, parse_quant_config, unpack_nibbles
from llmdrop_rt.quant.linear import BACKEND_ENV, QuantLinear


def _with_group(cfg: QuantConfig, **changes) -> QuantConfig:
    return QuantConfig(**{**cfg.__dict__, **changes})


@pytest.fixture(scope="module")
def awq_gemm_module():
    module = import_bypassing_package_init("awq", "modules.linear.gemm")
    assert module is not None, "autoawq is not installed (see the Makefile's venv recipe)"
    return module


@pytest.fixture(scope="module")
def autogptq_module():
    module = import_bypassing_package_init("auto_gptq", "nn_modules.qlinear.qlinear_cuda")
    assert module is not None, "auto-gptq is not installed (see the Makefile's venv recipe)"
    return module


@pytest.fixture(scope="module", params=[512, 256, 0], ids=["avx512", "avx2", "portable"])
def cpu_ext(request):
    """The C++ ops with the vector width capped at AVX-512, AVX2 and none (portable loops); a CPU
    without a width runs the next narrower one."""
    ops = linear._int4_cpu
    assert ops is not None, (
        "llmdrop_rt._int4_cpu is not built: install with `pip install --no-build-isolation -e .` "
        "or run `python setup.py build_ext --inplace` with torch present")
    assert ops.set_max_simd_bits(request.param) <= request.param
    yield ops
    ops.set_max_simd_bits(512)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)


# ------------------------------------------------------------------------------------------------
# Fake-quantized weights
# ------------------------------------------------------------------------------------------------
def make_fake_quant(out_features, in_features, group_size, *, sym, g_idx=None, zero_low=0, seed=0):
    """Random q, zeros, fp16 scales and the exactly representable fp32 W = (q - z[g]) * s[g]."""
    gen = torch.Generator().manual_seed(seed)
    g = in_features if group_size == -1 else group_size
    groups = -(-in_features // g)
    if g_idx is None:
        g_idx = torch.arange(in_features) // g
    q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    if sym:
        zeros = torch.full((groups, out_features), 8, dtype=torch.int16)
    else:
        zeros = torch.randint(zero_low, 16, (groups, out_features), generator=gen, dtype=torch.int16)
    scales = (torch.rand(groups, out_features, generator=gen) * 0.02 + 0.002).half()
    weights = Int4Weights(q, zeros, scales, g_idx.to(torch.int64))
    w = (q.float() - zeros.t()[:, g_idx].float()) * scales.t()[:, g_idx].float()
    return weights, w


def v1_to_v2_qzeros(qzeros_v1):
    """Documented offset: every stored nibble + 1 (no carries when all zeros are <= 15)."""
    words = qzeros_v1.to(torch.int64) & 0xFFFFFFFF
    words = words + 0x11111111
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def load(tensors, prefix, in_features, out_features, qconfig, bias=False):
    def get_tensor(name):
        return tensors[name.removeprefix(prefix + ".")]
    return QuantLinear.from_checkpoint(get_tensor, prefix, in_features, out_features, qconfig, bias)


def assert_matches_float64(y, x, w, bias=None, low_precision=False):
    """y ≈ x @ w.T + bias (float64), within a bound scaled by sum |x||w| (fp32 accumulation) and, for
    fp16/bf16 outputs, by |x @ w.T| + |bias| (the rounding of the product and of the bias add)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    product = x64 @ w.double().t()
    bias64 = torch.zeros(()) if bias is None else bias.double()
    expected = product + bias64
    bound = 1e-5 * (x64.abs() @ w.double().abs().t()) + 1e-6
    if low_precision:
        bound = bound + 1e-2 * (product.abs() + bias64.abs())
    err = (y.double().reshape(expected.shape) - expected).abs()
    assert torch.all(err <= bound), f"max error {err.max().item():.3e}, worst excess {(err - bound).max().item():.3e}"


# The packers only handle multiples of 32 (they size qweight as n // 32 * 4), so oracle shapes are
# multiples of 32 but not powers of two; test_cpp_kernel_multiples_of_8 covers the rest.
SHAPES_AWQ = [  # (out, in, group_size); AWQ needs group_size | in
    (96, 96, 32),
    (160, 320, 64),
    (32, 384, 128),
    (224, 224, -1),
]


# ------------------------------------------------------------------------------------------------
# AWQ gemm
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_features,in_features,group_size", SHAPES_AWQ)
def test_awq_unpack_matches_autoawq_packing(awq_gemm_module, out_features, in_features, group_size):
    weights, w = make_fake_quant(out_features, in_features, group_size, sym=False, seed=out_features)
    tensors = awq_checkpoint(awq_gemm_module, w, weights, group_size)
    cfg = QuantConfig("awq", "awq_gemm", group_size=group_size)
    unpacked = formats.unpack_awq_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                     cfg.group_size_for(in_features))
    assert torch.equal(unpacked.qvalues, weights.qvalues)
    assert torch.equal(unpacked.zeros, weights.zeros)
    assert torch.equal(dequantize_reference(unpacked), w)
    # And through QuantLinear's kernel layout and back.
    layer = load(tensors, "model.layers.0.mlp.up_proj", in_features, out_features, cfg)
    assert torch.equal(dequantize_reference(layer.int4_weights()), w)


def test_awq_reference_agrees_with_autoawq_dequantizer(awq_gemm_module):
    packing_utils = importlib.import_module("awq.utils.packing_utils")
    weights, w = make_fake_quant(96, 256, 64, sym=False, seed=7)
    tensors = awq_checkpoint(awq_gemm_module, w, weights, 64)
    theirs = packing_utils.dequantize_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, 64)  # [in, out]
    ours = dequantize_reference(formats.unpack_awq_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 64))
    torch.testing.assert_close(ours, theirs.t().float(), rtol=1e-3, atol=1e-3)


def test_awq_ignoring_the_interleave_gives_wrong_weights(awq_gemm_module):
    weights, w = make_fake_quant(32, 128, 64, sym=False, seed=3)
    tensors = awq_checkpoint(awq_gemm_module, w, weights, 64)
    plain_order = Int4Weights(unpack_nibbles(tensors["qweight"], dim=1).t().contiguous(),
                              unpack_nibbles(tensors["qzeros"], dim=1).to(torch.int16), tensors["scales"],
                              torch.arange(128) // 64)
    assert not torch.allclose(dequantize_reference(plain_order), w, atol=1e-3)
    # The interleave is a permutation within each 8-column block, so the right order recovers W exactly.
    right = formats.unpack_awq_gemm(tensors["qweight"], tensors["qzeros"], tensors["scales"], 64)
    assert torch.equal(dequantize_reference(right), w)


# ------------------------------------------------------------------------------------------------
# GPTQ v1 / v2
# ------------------------------------------------------------------------------------------------
SHAPES_GPTQ = [  # (out, in, group_size, sym, desc_act); GPTQ allows ceil(in / g) groups
    (96, 96, 32, True, False),
    (32, 320, 64, False, False),
    (160, 224, 64, False, True),   # 4 groups, the last of 32 columns, shuffled g_idx
    (32, 352, 128, True, True),    # 3 groups, the last of 96 columns
    (64, 160, -1, False, False),
]


def gptq_case(out_features, in_features, group_size, sym, desc_act, seed):
    g = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features) // g
    if desc_act:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))]
    # v1 cannot store a zero of 0 (zero - 1 = -1 overflows into the next nibble), so zeros are 1..15.
    return make_fake_quant(out_features, in_features, group_size, sym=sym, g_idx=g_idx, zero_low=1, seed=seed)


@pytest.mark.parametrize("out_features,in_features,group_size,sym,desc_act", SHAPES_GPTQ)
def test_gptq_v1_unpack_matches_autogptq_packing(autogptq_module, out_features, in_features, group_size, sym,
                                                  desc_act):
    weights, w = gptq_case(out_features, in_features, group_size, sym, desc_act, seed=in_features)
    tensors = gptq_v1_checkpoint(autogptq_module, w, weights, group_size)
    if sym:
        assert torch.all(tensors["qzeros"] == 0x77777777)  # the v1 convention, as GPTQModel writes it
    cfg = QuantConfig("gptq", "gptq", group_size=group_size, zero_point=not sym, desc_act=desc_act)
    unpacked = formats.unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                                 cfg.group_size_for(in_features), cfg.zero_offset)
    assert torch.equal(unpacked.qvalues, weights.qvalues)
    assert torch.equal(unpacked.zeros, weights.zeros)
    assert torch.equal(dequantize_reference(unpacked), w)
    layer = load(tensors, "model.layers.1.self_attn.q_proj", in_features, out_features, cfg)
    assert (layer.input_perm is not None) == desc_act
    assert torch.equal(dequantize_reference(layer.int4_weights()), w)


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_v2_is_v1_with_true_zeros(autogptq_module, desc_act):
    weights, w = gptq_case(96, 256, 64, False, desc_act, seed=11)
    tensors = gptq_v1_checkpoint(autogptq_module, w, weights, 64)
    v2 = {**tensors, "qzeros": v1_to_v2_qzeros(tensors["qzeros"])}
    cfg_v2 = QuantConfig("gptq", "gptq_v2", group_size=64, zero_point=True, desc_act=desc_act)
    layer = load(v2, "p", 256, 96, cfg_v2)
    assert torch.equal(dequantize_reference(layer.int4_weights()), w)
    # Reading v2 tensors as v1 (or v1 as v2) shifts every zero by one: visibly wrong.
    cfg_v1 = QuantConfig("gptq", "gptq", group_size=64, zero_point=True, desc_act=desc_act)
    assert not torch.allclose(dequantize_reference(load(v2, "p", 256, 96, cfg_v1).int4_weights()), w, atol=1e-3)
    assert not torch.allclose(dequantize_reference(load(tensors, "p", 256, 96, cfg_v2).int4_weights()), w, atol=1e-3)


@pytest.mark.parametrize("out_features,in_features,group_size,sym,desc_act", SHAPES_GPTQ)
def test_gptq_v2_unpack_matches_gptqmodel_packing(out_features, in_features, group_size, sym, desc_act):
    pytest.importorskip("gptqmodel", reason="GPTQModel is installed by `make test` (see the Makefile)")
    from int4_packers import gptq_v2_checkpoint

    # v2 stores true zeros, so 0 is allowed here (v1 could not hold it).
    g = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features) // g
    if desc_act:
        g_idx = g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(3))]
    weights, w = make_fake_quant(out_features, in_features, group_size, sym=sym, g_idx=g_idx, zero_low=0, seed=7)
    tensors = gptq_v2_checkpoint(w, weights, group_size, sym)
    cfg = QuantConfig("gptq", "gptq_v2", group_size=group_size, zero_point=not sym, desc_act=desc_act)
    layer = load(tensors, "model.layers.0.mlp.up_proj", in_features, out_features, cfg)
    assert torch.equal(layer.int4_weights().qvalues, weights.qvalues)
    assert torch.equal(dequantize_reference(layer.int4_weights()), w)


def test_gptq_high_nibble_first_gives_wrong_weights(autogptq_module):
    weights, w = gptq_case(64, 128, 32, False, False, seed=5)
    tensors = gptq_v1_checkpoint(autogptq_module, w, weights, 32)
    q_low_first = unpack_nibbles(tensors["qweight"], dim=0)  # [in, out]
    q_high_first = q_low_first.reshape(16, 8, 64).flip(1).reshape(128, 64)
    right = formats.unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], None, 32, 1)
    wrong = Int4Weights(q_high_first.t().contiguous(), right.zeros, right.scales, right.g_idx)
    assert torch.equal(dequantize_reference(right), w)
    assert not torch.allclose(dequantize_reference(wrong), w, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# C++ kernel vs float64 x @ W.T
# ------------------------------------------------------------------------------------------------
def test_cpp_extension_is_built(cpu_ext):
    assert linear.available_backends()["cpp"]


KERNEL_CASES = [  # (method, in_features, group_size, sym, desc_act); out_features = 72
    ("awq", 288, 32, False, False),
    ("awq", 288, -1, False, False),
    ("gptq", 288, 64, False, True),   # ceil(288 / 64) = 5 groups, shuffled g_idx
    ("gptq", 288, 128, True, False),
]


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 37])
@pytest.mark.parametrize("method,in_features,group_size,sym,desc_act", KERNEL_CASES)
def test_cpp_kernel_matches_float64(cpu_ext, awq_gemm_module, autogptq_module, method, in_features, group_size,
                                    sym, desc_act, rows):
    out_features = 96
    if method == "awq":
        weights, w = make_fake_quant(out_features, in_features, group_size, sym=sym, seed=rows)
        tensors = awq_checkpoint(awq_gemm_module, w, weights, group_size)
        cfg = QuantConfig("awq", "awq_gemm", group_size=group_size)
    else:
        weights, w = gptq_case(out_features, in_features, group_size, sym, desc_act, seed=rows)
        tensors = gptq_v1_checkpoint(autogptq_module, w, weights, group_size)
        cfg = QuantConfig("gptq", "gptq", group_size=group_size, zero_point=not sym, desc_act=desc_act)
    layer = load(tensors, "p", in_features, out_features, cfg)
    assert layer.backend_for(torch.zeros(1)) == "cpp"
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(100 + rows))
    assert_matches_float64(layer(x), x, w)


@pytest.mark.parametrize("group_size", [40, 8, -1])
def test_cpp_kernel_multiples_of_8(cpu_ext, group_size):
    """Shapes the packers cannot produce but the formats allow: in / out multiples of 8 only."""
    weights, w = make_fake_quant(40, 200, group_size, sym=False, seed=group_size)
    layer = QuantLinear.from_int4(weights, 200 if group_size == -1 else group_size)
    for rows in (1, 5, 11):
        x = torch.randn(rows, 200)
        assert_matches_float64(layer(x), x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_kernel_low_precision_activations(cpu_ext, dtype):
    weights, w = make_fake_quant(48, 192, 64, sym=False, seed=9)
    layer = QuantLinear.from_int4(weights, 64, bias=torch.randn(48).to(dtype))
    for rows in (1, 12):
        x = torch.randn(2, rows, 192).to(dtype)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (2, rows, 48)
        assert_matches_float64(y, x, w, bias=layer.bias, low_precision=True)


def test_cpp_dequantize_matches_reference(cpu_ext):
    weights, w = make_fake_quant(40, 264, 64, sym=False, seed=2)
    layer = QuantLinear.from_int4(weights, 64)
    assert torch.equal(cpu_ext.int4_dequantize(layer.qweight, layer.scales, layer.zeros, 64), w)


def test_backend_override_and_reference_path(cpu_ext, monkeypatch):
    weights, w = make_fake_quant(32, 128, 32, sym=False, seed=4)
    layer = QuantLinear.from_int4(weights, 32, bias=torch.randn(32))
    x = torch.randn(5, 128)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert layer.backend_for(x) == "reference"
    assert_matches_float64(layer(x), x, w, bias=layer.bias)
    monkeypatch.setenv(BACKEND_ENV, "cpp")
    assert_matches_float64(layer(x), x, w, bias=layer.bias)
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match="not built"):
        layer(x)
    monkeypatch.setenv(BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        layer(x)


def test_without_extensions_the_reference_runs(monkeypatch):
    monkeypatch.setattr(linear, "_int4_cpu", None)
    monkeypatch.setattr(linear, "_int4_cuda", None)
    weights, w = make_fake_quant(24, 96, 32, sym=False, seed=8)
    layer = QuantLinear.from_int4(weights, 32)
    x = torch.randn(3, 96)
    assert layer.backend_for(x) == "reference"
    assert_matches_float64(layer(x), x, w)
    monkeypatch.setenv(BACKEND_ENV, "cpp")
    with pytest.raises(RuntimeError, match="cpp"):
        layer(x)


def test_weight_bytes_counts_packed_tensors():
    weights, _ = make_fake_quant(64, 256, 128, sym=False)
    layer = QuantLinear.from_int4(weights, 128, bias=torch.zeros(64, dtype=torch.float16))
    assert layer.weight_bytes() == 64 * 256 // 2 + 2 * (64 * 2 * 2) + 64 * 2


# ------------------------------------------------------------------------------------------------
# Bad tensors: clear errors naming them
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def good_gptq(autogptq_module):
    weights, w = gptq_case(32, 128, 32, False, True, seed=1)
    return gptq_v1_checkpoint(autogptq_module, w, weights, 32), QuantConfig(
        "gptq", "gptq", group_size=32, zero_point=True, desc_act=True)


@pytest.mark.parametrize("name,bad,message", [
    ("qweight", torch.zeros(32, 16, dtype=torch.int32), r"layer\.qweight: expected shape \[16, 32\], got \[32, 16\]"),
    ("qweight", torch.zeros(15, 32, dtype=torch.int32), r"layer\.qweight: expected shape \[16, 32\], got \[15, 32\]"),
    ("qweight", torch.zeros(16, 32, dtype=torch.float16), r"layer\.qweight: expected dtype torch\.int32"),
    ("qzeros", torch.zeros(4, 3, dtype=torch.int32), r"layer\.qzeros: expected shape \[4, 4\], got \[4, 3\]"),
    ("scales", torch.zeros(4, 32, dtype=torch.int32), r"layer\.scales: expected dtype"),
    ("scales", torch.full((4, 32), float("nan"), dtype=torch.float16), r"layer\.scales: contains NaN"),
    ("g_idx", torch.zeros(127, dtype=torch.int32), r"layer\.g_idx: expected shape \[128\], got \[127\]"),
    ("g_idx", torch.full((128,), 4, dtype=torch.int32), r"layer\.g_idx: entry 0 is 4, expected 0\.\.3"),
    ("g_idx", torch.zeros(128, dtype=torch.int32), r"layer\.g_idx: each group must hold 32"),
])
def test_bad_tensor_is_named(good_gptq, name, bad, message):
    tensors, cfg = good_gptq
    with pytest.raises(ValueError, match=message):
        load({**tensors, name: bad}, "layer", 128, 32, cfg)


def test_missing_tensor_and_bad_dims_are_named(good_gptq, awq_gemm_module, autogptq_module):
    tensors, cfg = good_gptq
    with pytest.raises(ValueError, match=r"layer\.g_idx: missing"):
        load({k: v for k, v in tensors.items() if k != "g_idx"}, "layer", 128, 32, cfg)
    # Without act-order a missing g_idx means i // group_size.
    weights, w = gptq_case(32, 128, 32, False, False, seed=6)
    plain = gptq_v1_checkpoint(autogptq_module, w, weights, 32)
    del plain["g_idx"]
    layer = load(plain, "layer", 128, 32, _with_group(cfg, desc_act=False))
    assert torch.equal(dequantize_reference(layer.int4_weights()), w)
    with pytest.raises(ValueError, match=r"layer\.bias: missing"):
        load(tensors, "layer", 128, 32, cfg, bias=True)
    with pytest.raises(ValueError, match=r"layer: in_features=100"):
        load(tensors, "layer", 100, 32, cfg)
    no_desc = _with_group(cfg, desc_act=False)
    with pytest.raises(ValueError, match=r"layer\.g_idx: not i // 32 although desc_act is false"):
        load(tensors, "layer", 128, 32, no_desc)
    weights, w = make_fake_quant(32, 128, 32, sym=False)
    awq = awq_checkpoint(awq_gemm_module, w, weights, 32)
    awq_cfg = QuantConfig("awq", "awq_gemm", group_size=32)
    with pytest.raises(ValueError, match=r"q\.qweight: expected shape \[128, 4\], got \[4, 128\]"):
        load({**awq, "qweight": awq["qweight"].t().contiguous()}, "q", 128, 32, awq_cfg)
    with pytest.raises(ValueError, match=r"AWQ group_size=48 must divide in_features=128"):
        load(awq, "q", 128, 32, _with_group(awq_cfg, group_size=48))


# ------------------------------------------------------------------------------------------------
# Config parsing
# ------------------------------------------------------------------------------------------------
def test_parse_awq_and_gptq_configs(tmp_path):
    assert parse_quant_config({"model_type": "llama"}, tmp_path) is None
    awq = parse_quant_config({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}}, tmp_path)
    assert awq == QuantConfig("awq", "awq_gemm", 4, 128, True, False)
    gptq = parse_quant_config({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2", "pack_dtype": "int32"}}, None)
    assert gptq == QuantConfig("gptq", "gptq_v2", 4, -1, True, True)
    assert gptq.zero_offset == 0 and gptq.group_size_for(4096) == 4096
    # AutoGPTQ's quantize_config.json alone (no quant_method, v1 format).
    (tmp_path / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 64, "desc_act": False, "sym": True, "true_sequential": True}))
    side = parse_quant_config({}, tmp_path)
    assert side == QuantConfig("gptq", "gptq", 4, 64, False, False) and side.zero_offset == 1


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, r"version='gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, r"version='exllama'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"bits=8 is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, r"bits=3 is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     r"checkpoint_format='marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True}, r"is_marlin_format"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 100}, r"group_size=100: must be a multiple of 8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int8"}, r"pack_dtype='int8'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method='bitsandbytes'"),
    ({"quant_method": "gptq", "group_size": 128}, r"no bit width"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {r"+:.*\.mlp\..*": {"bits": 8}}},
     r"dynamic rule '\+:.*' is not supported: only exclusions"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "dynamic": {r".*down_proj": {"group_size": 32}}},
     r"dynamic rule '\.\*down_proj' is not supported"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {r"-:model\.layers\.(": {}}},
     r"bad regular expression"),
])
def test_unsupported_configs_name_the_field(qc, message):
    with pytest.raises(ValueError, match=message):
        parse_quant_config({"quantization_config": qc}, None)


def test_dynamic_exclusions_mark_modules_unquantized():
    """GPTQModel's negative `dynamic` rules (what `quantize` writes for dropped modules), matched from the start."""
    cfg = parse_quant_config({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128,
        "dynamic": {r"-:model\.layers\.1\.self_attn\.": {}, r"-:model\.layers\.2\.mlp\.": {}}}}, None)
    assert cfg.excluded == (r"model\.layers\.1\.self_attn\.", r"model\.layers\.2\.mlp\.")
    assert not cfg.quantizes("model.layers.1.self_attn.q_proj")
    assert not cfg.quantizes("model.layers.2.mlp.down_proj")
    assert cfg.quantizes("model.layers.11.self_attn.q_proj") and cfg.quantizes("model.layers.1.mlp.up_proj")
    assert cfg.quantizes("x.model.layers.1.self_attn.q_proj")  # anchored at the start, as GPTQModel's match


def test_conflicting_config_sources(tmp_path):
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "sym": True}))
    with pytest.raises(ValueError, match=r"disagree on 'group_size'"):
        parse_quant_config({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}, tmp_path)
