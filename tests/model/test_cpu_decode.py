"""The one-call-per-layer CPU decode step (csrc/cpu_decode.cpp) against the model's own modules on the same
weights: same tokens, same logits, with padding, GQA, a sliding window and dropped modules."""
import pytest
import torch

import llmdrop_rt
from llmdrop_rt.model import cpu_decode

pytestmark = pytest.mark.skipif(cpu_decode.ops is None, reason="llmdrop_rt._cpu_decode is not built")


def stepwise_logits(llm, prompts, new_tokens):
    """Every decode step's logits (batch, rows padded on the left), through the engine's own loop."""
    seen = []
    model = llm.model
    original = model.run

    def recording_run(tokens, ctx, last_only=False):
        logits = original(tokens, ctx, last_only)
        if tokens.shape[1] == 1:
            seen.append(logits[:, -1].clone())
        return logits

    model.run = recording_run
    try:
        ids = llm.generate_ids(prompts, new_tokens)
    finally:
        model.run = original
    return ids, torch.stack(seen)


@pytest.mark.parametrize("name, weights, drop_attn, drop_mlp", [
    ("mistral", "fp32", [], []),        # sliding window 7 < the 20+ positions decoded; 4 query heads per KV head
    ("mistral", "fp16", [1], [2]),
    ("llama3", "int8", [0, 5], [3]),
    ("llama3", "bf16", [], [5]),
])
def test_cpp_decode_step_equals_the_modules(tiny_checkpoints, name, weights, drop_attn, drop_mlp):
    gen = torch.Generator().manual_seed(len(name) + len(weights))
    prompts = [torch.randint(2, 300, (n,), generator=gen).tolist() for n in (9, 4, 13)]
    llm = llmdrop_rt.load(tiny_checkpoints[name], drop_attn=drop_attn, drop_mlp=drop_mlp, weights=weights)
    assert llm.model.decode_calls is not None
    ids, logits = stepwise_logits(llm, prompts, 16)
    calls, llm.model.decode_calls = llm.model.decode_calls, None
    try:
        reference_ids, reference_logits = stepwise_logits(llm, prompts, 16)
    finally:
        llm.model.decode_calls = calls
    assert ids == reference_ids
    # Block formats round each activation block to integers inside the GEMV, so the last-bit differences of the
    # two paths' norms can move a product by one rounding step.
    tolerance = 2e-3 if weights in ("int8", "int4") else 1e-4
    torch.testing.assert_close(logits, reference_logits, rtol=tolerance, atol=tolerance)


def test_the_cpu_default_is_our_fp32_kernels_and_torch_modules_keep_the_module_path(tiny_checkpoints):
    assert llmdrop_rt.load(tiny_checkpoints["llama3"]).model.decode_calls is not None  # weights="auto": fp32 kernels
    assert llmdrop_rt.load(tiny_checkpoints["llama3"], weights=None).model.decode_calls is None  # torch modules
