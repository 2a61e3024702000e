"""Continuous batching: every request's output equals the same request run alone, however it joins and leaves."""
import pytest
import torch
from helpers import VOCAB

import llmdrop_rt
from llmdrop_rt.engine import ContextLengthError, Sampling
from llmdrop_rt.engine.batching import BatchRequest, ContinuousBatcher


def random_requests(count, seed, sampling=lambda i: Sampling(), longest_prompt=14, most_new=16):
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        length = int(torch.randint(1, longest_prompt + 1, (), generator=gen))
        new = int(torch.randint(1, most_new + 1, (), generator=gen))
        requests.append(BatchRequest(torch.randint(2, VOCAB, (length,), generator=gen).tolist(), new, sampling(i)))
    return requests


def run_staggered(batcher, requests, cancel_after=None):
    """Join one waiting request every other step while a row is free; cancel `cancel_after` = (request, steps)
    once it has run that many steps. Returns the largest number of rows that ran together."""
    waiting, busiest = list(requests), 0
    for step in range(10_000):
        if waiting and batcher.free_rows and (step % 2 == 0 or not batcher.rows):
            batcher.join(waiting.pop(0))
        if cancel_after is not None and len(cancel_after[0].tokens) >= cancel_after[1]:
            cancel_after[0].cancel()
        busiest = max(busiest, len(batcher.rows))
        batcher.step()
        if not waiting and not batcher.rows:
            return busiest
    raise AssertionError("the batch never drained")


def solo(llm, request):
    return llm.engine.generate([request.prompt], request.max_new_tokens, request.sampling)[0]


@pytest.mark.parametrize("name, kv_cache", [("llama3", "auto"), ("mistral", "auto"), ("llama3", "fp16")])
def test_staggered_joins_equal_solo_runs_token_for_token(tiny_checkpoints, name, kv_cache):
    """Rows join mid-batch, leave at different steps and their rows are reused; the small pool forces the live
    columns to move back to its start several times (mistral's sliding window of 7 crosses those moves)."""
    llm = llmdrop_rt.load(tiny_checkpoints[name], kv_cache=kv_cache)
    batcher = ContinuousBatcher(llm.model, max_batch=4, max_len=32, attn_backend=llm.engine.attn_backend)
    assert batcher.pool.dtype == llm.model.kv_dtype
    requests = random_requests(11, seed=1)
    assert run_staggered(batcher, requests) == 4
    for request in requests:
        assert request.tokens == solo(llm, request)
        assert request.finish_reason == "length"


def test_wide_batch_of_dropped_model_equals_solo_runs(tiny_checkpoints):
    """More rows than the CPU kernels' GEMV path takes, on a model with dropped attention and MLP layers."""
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"], drop_attn=[1, 3], drop_mlp=[4])
    batcher = ContinuousBatcher(llm.model, max_batch=12, max_len=40, attn_backend=llm.engine.attn_backend)
    assert batcher.pool.k.shape[0] == 4  # kept attention layers only
    requests = random_requests(14, seed=2)
    for request in requests[:12]:
        batcher.join(request)
    run_staggered(batcher, requests[12:])
    for request in requests:
        assert request.tokens == solo(llm, request)


def test_seeded_sampling_per_row_equals_solo(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"])
    batcher = ContinuousBatcher(llm.model, max_batch=3, max_len=32)
    requests = random_requests(6, seed=3, sampling=lambda i: Sampling(temperature=0.9, top_p=0.9, seed=100 + i))
    requests[2].sampling = Sampling()  # a greedy row among sampled ones
    run_staggered(batcher, requests)
    for request in requests:
        assert request.tokens == solo(llm, request)


def test_eos_stop_and_cancel_leave_early_and_others_continue(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["mistral"])
    batcher = ContinuousBatcher(llm.model, max_batch=3, max_len=32)
    requests = random_requests(5, seed=4, most_new=12)
    for request in requests:
        request.max_new_tokens = 12
    alone = [solo(llm, request) for request in requests]
    requests[0].eos_ids = frozenset({alone[0][3]})
    requests[1].should_stop = lambda tokens: len(tokens) == 5
    run_staggered(batcher, requests, cancel_after=(requests[2], 4))
    assert requests[0].tokens == alone[0][:alone[0].index(alone[0][3]) + 1]
    assert requests[0].finish_reason == requests[1].finish_reason == "stop"
    assert requests[1].tokens == alone[1][:5]
    assert requests[2].finish_reason == "cancelled" and requests[2].tokens == alone[2][:len(requests[2].tokens)]
    assert [r.tokens for r in requests[3:]] == alone[3:]


def test_requests_beyond_the_pool_are_refused(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"])
    batcher = ContinuousBatcher(llm.model, max_batch=1, max_len=16)
    with pytest.raises(ContextLengthError, match="10 tokens \\+ max_new_tokens=7 = 17 exceeds the context of 16"):
        batcher.join(BatchRequest([5] * 10, 7))
    batcher.join(BatchRequest([5] * 10, 6))
    with pytest.raises(RuntimeError, match="no free row"):
        batcher.join(BatchRequest([5], 1))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        ContinuousBatcher(llm.model, max_batch=1, max_len=257)
