"""Generation through the static KV cache against transformers' generate, plus sampling and streaming."""
import pytest
import torch
from helpers import VOCAB, hf_greedy, hf_model, step_logits

import llmdrop_rt
from llmdrop_rt.engine import ContextLengthError, Sampling, generation, greedy, sample

PROMPT_LENGTHS = (5, 11, 8)


def prompts(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]




@pytest.mark.parametrize("name", ["llama3", "mistral", "llama2"])
def test_batched_greedy_equals_transformers(tiny_checkpoints, name):
    folder = tiny_checkpoints[name]
    llm = llmdrop_rt.load(folder)
    batch = prompts()
    ours = llm.engine.generate(batch, 32, Sampling(), eos_ids=frozenset())
    with torch.no_grad():
        ref = hf_greedy(hf_model(folder), batch, 32)
    assert ours == ref


def test_dropped_greedy_equals_identity_reference(tiny_checkpoints):
    """No cache on the reference side: greedy re-runs the whole sequence through transformers each step."""
    folder = tiny_checkpoints["llama3"]
    drop_attn, drop_mlp = [1, 2, 4], [4]
    llm = llmdrop_rt.load(folder, drop_attn=drop_attn, drop_mlp=drop_mlp)
    ref_model = hf_model(folder, drop_attn, drop_mlp)
    for prompt in prompts(seed=1):
        ours = llm.engine.generate([prompt], 12, Sampling())[0]
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(ref_model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert ours == seq[len(prompt):]


def test_eos_stops_a_row_and_others_continue(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama2"])
    batch = prompts()
    free = llm.engine.generate(batch, 10, Sampling())
    eos = free[0][3]  # make row 0's 4th token the "EOS"
    stopped = llm.engine.generate(batch, 10, Sampling(), eos_ids={eos})
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    for row in (1, 2):
        expected = free[row][: free[row].index(eos) + 1] if eos in free[row] else free[row]
        assert stopped[row] == expected


def test_sampling_is_seeded_and_filters_apply():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = Sampling(temperature=0.8, top_k=5, seed=1)
    draws = lambda p: torch.stack([sample(logits, p, torch.Generator().manual_seed(i)) for i in range(200)])
    k_draws = draws(params)
    top5 = logits.topk(5).indices
    assert all(torch.isin(k_draws[:, r], top5[r]).all() for r in range(4))
    assert torch.equal(k_draws, draws(params))  # same seeds, same tokens
    p_draws = draws(Sampling(temperature=1.0, top_p=0.3))
    probs = logits.softmax(-1)
    for r in range(4):  # every drawn token lies in the smallest set whose mass reaches 0.3
        sorted_p, order = probs[r].sort(descending=True)
        nucleus = order[: int((sorted_p.cumsum(0) < 0.3).sum()) + 1]
        assert torch.isin(p_draws[:, r], nucleus).all()
    assert torch.equal(sample(logits, Sampling(), None), logits.argmax(-1))


def test_sampled_generation_reproducible_with_seed(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"])
    a = llm.generate_ids(prompts(), 16, temperature=1.0, top_p=0.9, seed=7)
    b = llm.generate_ids(prompts(), 16, temperature=1.0, top_p=0.9, seed=7)
    c = llm.generate_ids(prompts(), 16, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_text_api_stream_and_stop_strings(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama2"])
    full = llm.generate("hello there", max_new_tokens=24)[0]
    streamed = "".join(llm.stream("hello there", max_new_tokens=24))
    assert streamed == full and len(full) > 0
    stop = full[5:7]
    cut = llm.generate("hello there", max_new_tokens=24, stop=[stop])[0]
    assert cut == full[: full.index(stop)]
    chat = llm.chat_prompt("hi")
    assert chat == "<user>hi\n<assistant>"


def test_too_long_prompt_is_a_clear_error(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama2"])  # context 256
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 256"):
        llm.generate_ids([[5] * 250], max_new_tokens=10)
    with pytest.raises(ValueError, match="exceed the model's context"):
        llm.logits([[5] * 300])


@pytest.mark.parametrize("name, kv_cache", [("mistral", "auto"), ("llama3", "auto"), ("mistral", "fp16")])
def test_static_shape_decode_equals_dynamic(tiny_checkpoints, name, kv_cache):
    """The CUDA-graph step's static path (run eagerly here) decodes exactly like the ordinary path,
    padding, sliding window and a narrower KV cache included."""
    llm = llmdrop_rt.load(tiny_checkpoints[name], drop_attn=[1], weights=None, kv_cache=kv_cache)
    batch = prompts(seed=4)
    dynamic = llm.engine.generate(batch, 20, Sampling())
    llm.engine.decode = "static"
    assert llm.engine.generate(batch, 20, Sampling()) == dynamic


@pytest.mark.parametrize("kv_cache, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_a_narrow_kv_cache_is_an_fp32_cache_of_rounded_keys_and_values(tiny_checkpoints, monkeypatch, kv_cache,
                                                                       dtype):
    """Prefill and decode (torch modules, padded rows) attend over K/V rounded once to the cache's dtype: exactly
    what an fp32 cache holding those rounded values gives, and not what the plain fp32 cache gives."""
    folder = tiny_checkpoints["llama3"]
    narrow = llmdrop_rt.load(folder, weights=None, kv_cache=kv_cache)
    exact = llmdrop_rt.load(folder, weights=None)
    assert narrow.model.kv_dtype == dtype and exact.model.kv_dtype == torch.float32
    assert narrow.kv_cache_bytes(2, 10) * 2 == exact.kv_cache_bytes(2, 10)
    batch = prompts(seed=6)
    ids, logits = step_logits(narrow, batch, 12)
    _, plain_logits = step_logits(exact, batch, 12)

    class RoundingCache(generation.KVCache):
        def write(self, layer, k, v, start):
            return super().write(layer, k.to(dtype).float(), v.to(dtype).float(), start)

    monkeypatch.setattr(generation, "KVCache", RoundingCache)
    reference_ids, reference_logits = step_logits(exact, batch, 12)
    assert ids == reference_ids
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    assert (logits - plain_logits).abs().max() > 1e-4
    # `logits()` scores as generation computes: row 1, the longest prompt, is not padded.
    longest = batch[1]
    torch.testing.assert_close(narrow.logits(longest)[0, -1], logits[0, 1], rtol=1e-5, atol=1e-5)


def test_kv_cache_names_are_checked(tiny_checkpoints):
    with pytest.raises(ValueError, match=r"kv_cache='int8' is not one of \['auto', 'fp32', 'fp16', 'bf16'\]"):
        llmdrop_rt.load(tiny_checkpoints["llama3"], kv_cache="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_equals_dynamic(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"], drop_attn=[2], device="cuda", dtype="float32")
    batch = prompts(seed=5)
    llm.engine.decode = "dynamic"
    dynamic = llm.engine.generate(batch, 20, Sampling())
    llm.engine.decode = "graph"
    assert llm.engine.generate(batch, 20, Sampling()) == dynamic


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_picks_first_maximum_like_torch_argmax(dtype):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 3, 777, generator=gen).to(dtype)
    logits[0, -1, [11, 400]] = 50.0  # a tie: the first index wins
    logits[1, -1, [7, 90]] = float("nan")  # NaN wins, the first one
    logits[2, -1, :] = 0.0  # all equal
    rows = logits[:, -1]  # a strided view, as the generation loop passes it
    picked = greedy(rows)
    assert picked.dtype == torch.int64 and torch.equal(picked, rows.argmax(dim=-1))
    assert picked[:3].tolist() == [11, 7, 0]
