"""The one-call CPU decode step (csrc/cpu_decode.cpp) against the model's own modules on the same
weights: same tokens, same logits, with padding, GQA, a sliding window, dropped modules and fp16 / bf16 KV caches."""
import pytest
import torch
from helpers import step_logits

import llmdrop_rt
from llmdrop_rt.model import cpu_decode
from llmdrop_rt.model.cache import KVCache

pytestmark = pytest.mark.skipif(cpu_decode.ops is None, reason="llmdrop_rt._cpu_decode is not built")


def stack_and_module_steps(llm, prompts, new_tokens):
    """step_logits through the C++ decode stack, then through the model's own modules."""
    assert llm.model.decode_stack is not None
    with_stack = step_logits(llm, prompts, new_tokens)
    stack, llm.model.decode_stack = llm.model.decode_stack, None
    try:
        return with_stack, step_logits(llm, prompts, new_tokens)
    finally:
        llm.model.decode_stack = stack


@pytest.mark.parametrize("name, weights, drop_attn, drop_mlp, kv_cache", [
    ("mistral", "fp32", [], [], "auto"),  # sliding window 7 < the 20+ positions decoded; 4 query heads per KV head
    ("mistral", "fp16", [1], [2], "auto"),
    ("llama3", "int8", [0, 5], [3], "auto"),
    ("llama3", "bf16", [], [5], "auto"),
    ("llama3", "int8", [], [], "fp16"),  # the modules write and read the cache through torch's conversions
    ("mistral", "fp32", [2], [], "bf16"),
])
def test_cpp_decode_step_equals_the_modules(tiny_checkpoints, name, weights, drop_attn, drop_mlp, kv_cache):
    gen = torch.Generator().manual_seed(len(name) + len(weights))
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in (9, 4, 13)]
    llm = llmdrop_rt.load(tiny_checkpoints[name], drop_attn=drop_attn, drop_mlp=drop_mlp, weights=weights,
                          kv_cache=kv_cache)
    (ids, logits), (reference_ids, reference_logits) = stack_and_module_steps(llm, prompts, 16)
    assert ids == reference_ids
    # Block formats round each activation block to integers inside the GEMV, so the last-bit differences of the
    # two paths' norms can move a product by one rounding step.
    tolerance = 2e-3 if weights in ("int8", "int4") else 1e-4
    torch.testing.assert_close(logits, reference_logits, rtol=tolerance, atol=tolerance)


@pytest.fixture
def torch_threads():
    """Sets torch's thread count for a test and restores it after."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("weights", ["int4", "fp16"])
def test_a_team_of_threads_computes_what_one_thread_does(tiny_checkpoints, torch_threads, weights):
    """Up to 8 rows, one team of threads runs the whole step, each GEMV, attention and SiLU split between them: the
    same numbers as on one thread, bit for bit, with more threads than this machine has cores too."""
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in (5, 11, 3, 8, 2)]
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"], weights=weights, drop_attn=[2], kv_cache="fp16")
    runs = {}
    for threads in (1, 2, 3):
        torch_threads(threads)
        runs[threads] = step_logits(llm, prompts, 12)
    for threads in (2, 3):
        assert runs[threads][0] == runs[1][0]
        assert torch.equal(runs[threads][1], runs[1][1]), f"{threads} threads"


def test_more_rows_than_a_team_takes_still_equal_the_modules(tiny_checkpoints, torch_threads):
    """Above 8 rows each phase uses torch's thread pool itself (GEMMs for the dense weights)."""
    torch_threads(2)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in range(2, 13)]
    llm = llmdrop_rt.load(tiny_checkpoints["mistral"], weights="fp32", drop_mlp=[1])
    (ids, logits), (reference_ids, reference_logits) = stack_and_module_steps(llm, prompts, 6)
    assert ids == reference_ids
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)


def test_the_cpu_default_is_our_fp32_kernels_and_torch_modules_keep_the_module_path(tiny_checkpoints):
    assert llmdrop_rt.load(tiny_checkpoints["llama3"]).model.decode_stack is not None  # weights="auto": fp32 kernels
    assert llmdrop_rt.load(tiny_checkpoints["llama3"], weights=None).model.decode_stack is None  # torch modules


def test_the_stack_refuses_an_output_that_does_not_fit_its_layers(tiny_checkpoints):
    model = llmdrop_rt.load(tiny_checkpoints["llama3"], weights="fp16").model
    cfg, norm, head = model.cfg, model.norm.weight, model.lm_head
    empty = torch.classes.llmdrop_cpu_decode.DecodeStack(cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads,
                                                         cfg.head_dim)
    with pytest.raises(RuntimeError, match="set_output needs the layers first"):
        empty.set_output(norm, head.weight, head.fmt, None)
    stack = cpu_decode.decode_stack(model)
    with pytest.raises(RuntimeError, match="final norm size"):
        stack.set_output(norm[:-1], head.weight, head.fmt, None)
    with pytest.raises(RuntimeError, match=r"lm_head weight must be Half \[out, %d\]" % cfg.hidden_size):
        stack.set_output(norm, head.weight[:, :-2].contiguous(), head.fmt, None)


def test_the_stack_refuses_an_input_that_does_not_fit_its_layers(tiny_checkpoints):
    model = llmdrop_rt.load(tiny_checkpoints["llama3"], weights="int8").model
    cfg, embed = model.cfg, model.embed
    empty = torch.classes.llmdrop_cpu_decode.DecodeStack(cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads,
                                                         cfg.head_dim)
    with pytest.raises(RuntimeError, match="set_input needs the layers first"):
        empty.set_input(embed.weight, embed.fmt, model.inv_freq, 0)
    stack = cpu_decode.decode_stack(model)
    with pytest.raises(RuntimeError, match=r"inv_freq must be fp32 \[%d\]" % (cfg.head_dim // 2)):
        stack.set_input(embed.weight, embed.fmt, model.inv_freq[1:], 0)
    with pytest.raises(RuntimeError, match="embedding weight must be uint8 q8_0 blocks"):
        stack.set_input(embed.weight[:, :-1].contiguous(), embed.fmt, model.inv_freq, 0)
    cache = KVCache(cfg, model.plan, 1, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"token id %d outside the vocabulary" % cfg.vocab_size):
        stack.decode(torch.tensor([cfg.vocab_size]), torch.tensor([3]), cache.k, cache.v, 3, None)
    with pytest.raises(RuntimeError, match=r"key_valid must be \[1, >= 4\]"):
        stack.decode(torch.tensor([5]), torch.tensor([3]), cache.k, cache.v, 3, torch.ones(1, 3, dtype=torch.bool))


@pytest.fixture(params=[256, 0], ids=["avx2", "portable"])
def decode_simd(request):
    width = cpu_decode.ops.set_max_simd_bits(request.param)
    if width != request.param:
        pytest.skip(f"this CPU has no {request.param}-bit kernels")
    yield width
    cpu_decode.ops.set_max_simd_bits(512)


def rotate_half(v, cos, sin):
    half = v.shape[-1] // 2
    a, b = v[..., :half], v[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def reference_attention(x, pending, norm, qkv_weight, o_weight, k_cache, v_cache, start, cos, sin, mask, eps,
                        heads, kv_heads, d):
    """decode_layer's attention sub-block in float64 torch: (new residual, o_proj output, k and v caches). The new
    key and value are rounded to the caches' dtype before attention reads them, as the cache stores them."""
    rounded = k_cache.dtype
    x, k_cache, v_cache = x.double() + pending.double(), k_cache.double().clone(), v_cache.double().clone()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    q, k, v = (normed @ qkv_weight.double().T).split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    rows = x.shape[0]
    cos, sin = cos.double()[:, None], sin.double()[:, None]
    q = rotate_half(q.view(rows, heads, d), cos, sin)
    k_cache[:, :, start] = rotate_half(k.view(rows, kv_heads, d), cos, sin).to(rounded).double()
    v_cache[:, :, start] = v.view(rows, kv_heads, d).to(rounded).double()
    keys = k_cache[:, :, :start + 1].repeat_interleave(heads // kv_heads, dim=1)
    values = v_cache[:, :, :start + 1].repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhd,bhjd->bhj", q, keys) / d ** 0.5
    scores = scores.masked_fill(~mask[:, None, :start + 1], float("-inf"))
    out = torch.einsum("bhj,bhjd->bhd", scores.softmax(-1), torch.where(scores[..., None].isinf(), 0, values))
    return x, out.reshape(rows, heads * d) @ o_weight.double().T, k_cache, v_cache


# The cache's dtype: how far a stored value may sit from float64's rounding of it (one unit in the last place), and
# how far the layer's output may then move.
CACHE_DTYPES = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-3), torch.bfloat16: (8e-3, 2e-3)}


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
# Fewer than 8 (row, KV head) pairs: query heads in passes of 2 (and 1); from 8 on, of up to 4.
@pytest.mark.parametrize("rows, heads, kv_heads, d, start", [
    (2, 9, 3, 64, 36),     # SmolLM2's heads at a small batch (passes of 2 + 1), keys not a multiple of 8
    (3, 9, 3, 64, 36),     # the same in one pass of 3 heads
    (2, 4, 2, 136, 300),   # two 64-column chunks and one vector of values per head
    (2, 6, 6, 20, 8),      # columns after the last whole vector, no grouping
    (2, 8, 2, 24, 1100),   # enough work per head to spread heads over threads
    (4, 12, 2, 40, 50),    # 6 query heads per KV head: passes of 4 and 2 heads
    (4, 10, 2, 20, 13),    # 5 per KV head (4 + 1), columns and keys left over from every blocking
])
def test_decode_layer_attention_equals_float64(decode_simd, rows, heads, kv_heads, d, start, cache_dtype):
    gen = torch.Generator().manual_seed(heads * 1000 + d + start)
    hidden, slots = 48, start + 5
    x, pending = torch.randn(rows, hidden, generator=gen), torch.randn(rows, hidden, generator=gen)
    norm = torch.rand(hidden, generator=gen) + 0.5
    qkv_weight = torch.randn((heads + 2 * kv_heads) * d, hidden, generator=gen) / hidden ** 0.5
    o_weight = torch.randn(hidden, heads * d, generator=gen) / (heads * d) ** 0.5
    k_cache = torch.randn(rows, kv_heads, slots, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(rows, kv_heads, slots, d, generator=gen).to(cache_dtype)
    mask = torch.rand(rows, slots, generator=gen) > 0.3
    mask[:, start] = True
    # Slots past the new key and masked slots are never read: poisoned, they must not reach the output.
    k_cache[:, :, start + 1:] = v_cache[:, :, start + 1:] = float("nan")
    hidden_keys = ~mask[:, None, :, None].expand_as(k_cache)
    k_cache[hidden_keys], v_cache[hidden_keys] = float("nan"), float("nan")
    angles = torch.rand(rows, d // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    expected = reference_attention(x, pending, norm, qkv_weight, o_weight, k_cache, v_cache, start, cos, sin, mask,
                                   1e-5, heads, kv_heads, d)
    out = cpu_decode.ops.decode_layer(x, pending, norm, qkv_weight, "f32", None, o_weight, "f32", None, k_cache,
                                      v_cache, start, cos, sin, mask, None, None, "", None, None, "", None, 1e-5,
                                      heads, kv_heads, d)
    stored, output = CACHE_DTYPES[cache_dtype]
    for got, want, tolerance in zip((x, out, k_cache[:, :, start], v_cache[:, :, start]),
                                    (expected[0], expected[1], expected[2][:, :, start], expected[3][:, :, start]),
                                    (1e-4, output, stored, stored)):
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
    assert k_cache[:, :, start + 1:].isnan().all()  # nothing written past the new key


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_new_keys_and_values_are_rounded_as_torch_converts_them(decode_simd, cache_dtype):
    """What decode stores in a narrow cache is bit for bit torch's conversion of the fp32 key and value (prefill
    writes through torch), including values that overflow fp16 and that sit below its normal range."""
    gen = torch.Generator().manual_seed(7)
    rows, heads, kv_heads, d, start, hidden = 3, 4, 2, 40, 5, 32
    x, pending = torch.randn(rows, hidden, generator=gen), torch.randn(rows, hidden, generator=gen)
    norm = torch.ones(hidden)
    qkv_weight = torch.randn((heads + 2 * kv_heads) * d, hidden, generator=gen)
    qkv_weight[-kv_heads * d:] *= torch.logspace(-8, 5, kv_heads * d)[:, None]  # v spans subnormals to overflow
    o_weight = torch.randn(hidden, heads * d, generator=gen)
    angles = torch.rand(rows, d // 2, generator=gen) * 6
    cos, sin = angles.cos(), angles.sin()
    stored = {}
    for dtype in (torch.float32, cache_dtype):
        k_cache = torch.zeros(rows, kv_heads, start + 3, d, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        cpu_decode.ops.decode_layer(x.clone(), pending, norm, qkv_weight, "f32", None, o_weight, "f32", None,
                                    k_cache, v_cache, start, cos, sin, None, None, None, "", None, None, "", None,
                                    1e-5, heads, kv_heads, d)
        stored[dtype] = k_cache[:, :, start], v_cache[:, :, start]
    for exact, narrow in zip(stored[torch.float32], stored[cache_dtype]):
        assert torch.equal(exact.to(cache_dtype), narrow)
