"""Profiling: named ranges per layer and module kind land in the trace; off by default; dropped modules absent."""
from __future__ import annotations

import json

import torch

import llmdrop_rt
from llmdrop_rt.bench.profile import profile
from llmdrop_rt.model.ranges import NO_LAYER_RANGES, NO_STACK_RANGES, range_kind, ranges_enabled


def trace_names(path) -> set[str]:
    return {event.get("name") for event in json.loads(open(path).read())["traceEvents"]}


def test_profile_ranges_kinds_and_memory(tiny_checkpoints, tmp_path):
    torch.set_num_threads(1)
    llm = llmdrop_rt.load(tiny_checkpoints["llama3"], drop_attn=[1, 4], drop_mlp=[2])
    report = profile(llm, prompt_len=9, new_tokens=5, batch_size=2, out_dir=tmp_path, top=5)

    prefill, decode = report.phases
    assert (prefill.name, prefill.tokens, decode.name, decode.tokens) == ("prefill", 18, "decode", 8)
    for phase in report.phases:
        names = trace_names(phase.trace)
        kept_attn = {f"L{i}.attention" for i in range(6) if i not in (1, 4)}
        assert kept_attn <= names and not {"L1.attention", "L4.attention", "L1.attn_norm"} & names
        assert {f"L{i}.mlp" for i in (0, 1, 3, 4, 5)} <= names and "L2.mlp" not in names
        assert {"embedding", "final_norm", "lm_head"} <= names
        assert all(phase.by_kind_s[kind] > 0 for kind in ("attention", "mlp", "norm", "lm_head"))
        assert sum(phase.by_kind_s.values()) >= phase.wall_s * 0.99  # 'other' fills the rest of the wall time
        assert 0 < len(phase.top_ops) <= 5 and phase.top_ops[0]["self_s"] >= phase.top_ops[-1]["self_s"]
    kv = [point["kv_bytes"] for point in report.memory]
    assert kv == [0, llm.kv_cache_bytes(2, 14), llm.kv_cache_bytes(2, 14)]
    assert all(point["weight_bytes"] == llm.param_bytes() for point in report.memory)
    assert json.loads((tmp_path / "profile.json").read_text())["num_layers"] == 6
    assert "| attention |" in report.format()
    # Profiling leaves the model as it found it: no-op ranges, the engine's decode mode.
    assert all(layer.ranges is NO_LAYER_RANGES for layer in llm.model.layers) and llm.model.ranges is NO_STACK_RANGES
    assert llm.engine.decode == "auto"


def test_ranges_do_not_change_results(tiny_checkpoints):
    llm = llmdrop_rt.load(tiny_checkpoints["mistral"], drop_attn=[0])
    tokens = torch.randint(0, llm.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    plain = llm.logits(tokens)
    with ranges_enabled(llm.model):
        with torch.profiler.profile() as prof:
            ranged = llm.logits(tokens)
    assert torch.equal(plain, ranged)
    recorded = {event.key for event in prof.key_averages()}
    assert {"L1.attention", "L0.mlp", "L3.mlp_norm", "lm_head"} <= recorded and "L0.attention" not in recorded


def test_range_kind():
    assert [range_kind(n) for n in ("L12.attn_norm", "L0.attention", "L3.mlp_norm", "L7.mlp")] == [
        "norm", "attention", "norm", "mlp"]
    assert [range_kind(n) for n in ("embedding", "final_norm", "lm_head")] == ["embedding", "norm", "lm_head"]
    assert range_kind("aten::mm") is None and range_kind("Lx.mlp") is None and range_kind("decode") is None
