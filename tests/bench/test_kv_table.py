"""KV-cache table: the meta-device figures for big shapes vs an independent count from transformers' configs, and
the runtime's real allocation on small models vs both the arithmetic and transformers' own cache."""
from __future__ import annotations

import pytest
import torch

import llmdrop_rt
import llmdrop_rt.engine.generation as engine_module
from llmdrop_rt.bench.kv_table import PAPER_ROWS, cache_bytes, format_kv_table, kv_rows
from llmdrop_rt.bench.synthetic import CONFIGS


def transformers_kv_bytes(name, batch, seq, kept, element=2):
    """The cache size from transformers' own config class for the same shape (its head_dim and kv heads)."""
    from transformers import AutoConfig

    raw = CONFIGS[name]
    model_type = "mistral" if "MistralForCausalLM" in raw["architectures"] else "llama"
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "architectures"})
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * kept * batch * cfg.num_key_value_heads * seq * head_dim * element


@pytest.mark.parametrize("name,batch,kept", PAPER_ROWS)
def test_table_rows_match_transformers_shapes(name, batch, kept):
    seq = 2048
    row = next(r for r in kv_rows(seq=seq) if r["model"] == name)
    assert row["full_bytes"] == transformers_kv_bytes(name, batch, seq, row["layers_full"])
    assert row["dropped_bytes"] == transformers_kv_bytes(name, batch, seq, kept)
    assert row["dropped_bytes"] * row["layers_full"] == row["full_bytes"] * kept


def test_paper_figures_in_gib():
    rows = {r["model"]: r for r in kv_rows()}
    assert rows["mistral-7b"]["full_bytes"] == 16 * 2**30 and rows["mistral-7b"]["dropped_bytes"] == 10 * 2**30
    assert rows["llama-2-70b"]["full_bytes"] == 20 * 2**30 and rows["llama-2-70b"]["dropped_bytes"] == 10 * 2**30
    table = format_kv_table(list(rows.values()))
    assert "| llama-2-13b | 32 | 2048 | 40 → 20 | 50.0 → 25.0 | 50.0% | 52 → 26 |" in table


class RecordingCache(engine_module.KVCache):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingCache.made.append(self)


def allocated_during_generation(llm, batch, prompt_len, new_tokens, monkeypatch):
    RecordingCache.made = []
    monkeypatch.setattr(engine_module, "KVCache", RecordingCache)
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, llm.cfg.vocab_size, (batch, prompt_len), generator=gen).tolist()
    llm.generate_ids(prompts, max_new_tokens=new_tokens)
    (cache,) = RecordingCache.made
    return cache.nbytes()


@pytest.mark.parametrize("name,drop", [("llama3", [0, 2, 5]), ("mistral", [3]), ("sharded", [])])
def test_real_allocation_on_tiny_models(tiny_checkpoints, monkeypatch, name, drop):
    llm = llmdrop_rt.load(tiny_checkpoints[name], drop_attn=drop)
    got = allocated_during_generation(llm, batch=3, prompt_len=7, new_tokens=4, monkeypatch=monkeypatch)
    cfg = llm.cfg
    assert got == llm.kv_cache_bytes(3, 11)
    assert got == 2 * (cfg.num_layers - len(drop)) * 3 * cfg.num_kv_heads * 11 * cfg.head_dim * 4


def test_full_cache_equals_transformers_cache(tiny_checkpoints):
    """Our full model's cache holds exactly what transformers' DynamicCache holds for the same tokens."""
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoints["llama3"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.randint(3, 200, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = hf(tokens, use_cache=True).past_key_values
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert llmdrop_rt.load(folder).kv_cache_bytes(2, 13) == hf_bytes


def test_smollm2_half_attention_halves_kv_exactly(smollm2_dir, monkeypatch):
    full = llmdrop_rt.load(smollm2_dir)
    half = llmdrop_rt.load(smollm2_dir, drop_attn=list(range(14, 29)))
    got_full = allocated_during_generation(full, 2, 5, 3, monkeypatch)
    got_half = allocated_during_generation(half, 2, 5, 3, monkeypatch)
    assert got_half * 2 == got_full
    # The weight-free figure for the same shape agrees with the real allocation (fp32 here).
    assert cache_bytes("smollm2-135m", 2, 8, 15, torch.float32) == got_half
    assert cache_bytes("smollm2-135m", 2, 8, None, torch.float32) == got_full
