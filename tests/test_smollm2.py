"""The real SmolLM2-135M-Instruct (embedded default) against transformers on the same weights, fp32."""
import math

import pytest
import torch
from helpers import DATA

import llmdrop_rt

EVAL_TEXT = DATA / "eval.txt"


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return llmdrop_rt.load(smollm2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def test_greedy_chat_continuation_equals_transformers(ours, reference):
    prompt = ours.chat_prompt("Name three things people often keep in a kitchen drawer.")
    ids = ours.tokenizer.encode(prompt)
    new = ours.generate_ids([ids], max_new_tokens=32)[0]
    with torch.no_grad():
        ref = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                 eos_token_id=sorted(ours.eos_ids), pad_token_id=2)[0, len(ids):].tolist()
    assert new == ref
    assert len(ours.tokenizer.decode(new).split()) > 3  # real words, not an empty/degenerate answer


def nll_per_token(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="sum").item()


def test_perplexity_on_real_text_matches_transformers(ours, reference):
    ids = ours.tokenizer.encode(EVAL_TEXT.read_text())
    window = 256
    windows = [torch.tensor([ids[i:i + window]]) for i in range(0, 3 * window, window)]
    ours_nll = sum(nll_per_token(ours.logits(w), w) for w in windows)
    with torch.no_grad():
        ref_nll = sum(nll_per_token(reference(w).logits, w) for w in windows)
    count = sum(w.shape[1] - 1 for w in windows)
    ours_ppl, ref_ppl = math.exp(ours_nll / count), math.exp(ref_nll / count)
    assert math.isfinite(ours_ppl) and 1 < ours_ppl < 200  # a real English model on real English text
    assert abs(ours_ppl - ref_ppl) / ref_ppl < 1e-4, (ours_ppl, ref_ppl)


def test_attention_dropped_smollm2_is_smaller_and_still_runs(ours, smollm2_dir):
    half = llmdrop_rt.load(smollm2_dir, drop_attn=list(range(14, 29)), dtype="float32", device="cpu")
    assert half.kv_cache_bytes(4, 512) * 2 == ours.kv_cache_bytes(4, 512)
    assert half.param_bytes() < ours.param_bytes()
    text = half.generate(half.chat_prompt("Say hello."), max_new_tokens=8)[0]
    assert isinstance(text, str)
