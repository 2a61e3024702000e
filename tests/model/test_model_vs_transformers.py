"""Our decoder stack against transformers' own model on the same tiny random checkpoints (fp32)."""
import pytest
import torch
from helpers import VOCAB, hf_model

import llmdrop_rt

ATOL = 1e-4


def random_tokens(batch, length, seed):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_full_model_logits_match(tiny):
    tokens = random_tokens(2, 23, seed=1)  # longer than the Mistral fixture's sliding window (7)
    ours = llmdrop_rt.load(tiny, dtype="float32").logits(tokens)
    with torch.no_grad():
        ref = hf_model(tiny)(tokens).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("drop_attn, drop_mlp", [([1, 2], []), ([], [0, 2]), ([1, 3], [1, 3]), ([0], [2])],
                         ids=["attn", "mlp", "block", "mixed"])
def test_dropped_model_logits_match_identity_reference(tiny, drop_attn, drop_mlp):
    tokens = random_tokens(2, 19, seed=2)
    llm = llmdrop_rt.load(tiny, drop_attn=drop_attn, drop_mlp=drop_mlp)
    with torch.no_grad():
        ref = hf_model(tiny, drop_attn, drop_mlp)(tokens).logits
        full = hf_model(tiny)(tokens).logits
    torch.testing.assert_close(llm.logits(tokens), ref, atol=ATOL, rtol=0)
    assert (ref - full).abs().max() > 1e-2  # the drop changes the output, so the comparison means something


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_cached_decode_matches_full_forward(tiny_checkpoints, backend):
    """Prefill + one-token decode steps through the KV cache give the same logits as one causal pass."""
    folder = tiny_checkpoints["mistral"]
    llm = llmdrop_rt.load(folder, drop_attn=[2], attn_backend=backend)
    tokens = random_tokens(1, 20, seed=3)
    full = llm.logits(tokens)
    from llmdrop_rt.model.cache import KVCache

    model = llm.model
    cache = KVCache(model.cfg, model.plan, 1, 20, torch.float32, "cpu")
    steps = []
    with torch.inference_mode():
        prefix = 5
        steps.append(model(tokens[:, :prefix], torch.arange(prefix)[None], cache, 0, None, backend))
        for t in range(prefix, 20):
            steps.append(model(tokens[:, t:t + 1], torch.tensor([[t]]), cache, t, None, backend))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
