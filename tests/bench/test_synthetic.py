"""Synthetic-weight models: the real shapes (parameter counts vs the published sizes, counted on the meta device),
runnable on CPU, clearly labelled, no tokenizer."""
from __future__ import annotations

import pytest
import torch

from llmdrop_rt.bench.synthetic import CONFIGS, SyntheticReader, load_synthetic, model_config, transformers_synthetic
from llmdrop_rt.config import DropPlan
from llmdrop_rt.model import ModelBuilder
from llmdrop_rt.model.ops import TORCH

# Published parameter counts (model cards / papers), in billions.
PUBLISHED = {"llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98, "mistral-7b": 7.24,
             "llama-3-8b": 8.03, "llama-3-70b": 70.55, "smollm2-135m": 0.1349}

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 40, "intermediate_size": 72, "num_hidden_layers": 5,
        "num_attention_heads": 5, "num_key_value_heads": 1, "vocab_size": 97, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def unique_numel(model) -> int:
    return sum({id(p): p.numel() for p in list(model.parameters())}.values())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shapes_give_published_parameter_counts(name):
    cfg = model_config(name)
    model = ModelBuilder(cfg, DropPlan.create(cfg.num_layers), SyntheticReader(torch.bfloat16, "meta"),
                         torch.bfloat16, "meta", TORCH).build()
    assert unique_numel(model) / 1e9 == pytest.approx(PUBLISHED[name], rel=0.005)


def test_synthetic_model_runs_and_is_labelled():
    llm = load_synthetic(TINY, drop_attn=[1, 3], dtype="float32", device="cpu", seed=3)
    assert llm.synthetic and "synthetic" in str(llm.folder)
    assert llm.model.layers[1].attn is None and llm.model.layers[0].attn is not None
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = llm.logits(tokens)
    assert logits.shape == (2, 9, 97) and torch.isfinite(logits).all()
    assert logits.std() > 0.05  # random weights of realistic scale: not a constant output
    out = llm.generate_ids(tokens.tolist(), max_new_tokens=5)
    assert [len(o) for o in out] == [5, 5]
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("hello")


def test_seed_decides_weights_and_drop_removes_exact_bytes():
    a = load_synthetic(TINY, dtype="float32", device="cpu", seed=1)
    b = load_synthetic(TINY, dtype="float32", device="cpu", seed=1)
    c = load_synthetic(TINY, dtype="float32", device="cpu", seed=2)
    assert torch.equal(a.model.layers[2].mlp.down.weight, b.model.layers[2].mlp.down.weight)
    assert not torch.equal(a.model.layers[2].mlp.down.weight, c.model.layers[2].mlp.down.weight)
    dropped = load_synthetic(TINY, drop_attn=[0, 4], dtype="float32", device="cpu")
    head_dim = 40 // 5
    attn_params = 40 * (5 + 1 + 1) * head_dim + 5 * head_dim * 40 + 40  # qkv + o_proj + input norm
    assert a.param_bytes() - dropped.param_bytes() == 2 * attn_params * 4


def test_transformers_baseline_skips_but_keeps_weights():
    full = transformers_synthetic(TINY, dtype=torch.float32)
    skipped = transformers_synthetic(TINY, skip_attn=[1, 2], dtype=torch.float32)
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in skipped.parameters())
    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(full(tokens).logits, skipped(tokens).logits)


def test_unknown_name_is_named():
    with pytest.raises(KeyError, match="llama-9"):
        model_config("llama-9")
    assert set(PUBLISHED) <= set(CONFIGS)
