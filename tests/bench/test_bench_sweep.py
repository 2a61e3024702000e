"""Bench sweeps: the bookkeeping (speedups, targets, job planning) on made-up rows, and one real tiny sweep through
the command line (subprocess workers, JSON, markdown, PNGs)."""
from __future__ import annotations

import argparse
import json

import pytest

from llmdrop_rt.bench import sweeps
from llmdrop_rt.bench.cli import main as bench_main
from llmdrop_rt.bench.quick import median_of_rounds
from llmdrop_rt.bench.sweeps import evaluate_targets, plan_jobs, with_speedups
from llmdrop_rt.bench.synthetic import model_config


def row(impl, drop, e2e, kv, decode=10.0, sweep="drop", device="cuda"):
    return dict(sweep=sweep, impl=impl, drop_count=drop, batch=1, prompt_len=8, new_tokens=8, e2e_s=e2e,
                e2e_cpu_s=e2e, decode_tok_s=decode, kv_bytes=kv, device=device)


def test_speedups_are_against_the_same_implementation():
    rows = with_speedups([row("llmdrop_rt", 0, 2.0, 400), row("llmdrop_rt", 15, 1.6, 200),
                          row("transformers", 0, 3.0, 400), row("transformers", 15, 2.7, 200)])
    assert [r["e2e_speedup"] for r in rows] == pytest.approx([1.0, 1.25, 1.0, 3.0 / 2.7])
    assert rows[1]["kv_ratio"] == 0.5


def test_targets_met_and_missed():
    cfg = model_config("smollm2-135m")  # 30 layers: half is 15
    args = argparse.Namespace(synthetic=None)
    met = evaluate_targets(with_speedups([row("llmdrop_rt", 0, 2.0, 400), row("llmdrop_rt", 15, 1.6, 200),
                                          row("transformers", 0, 3.0, 400), row("transformers", 15, 2.9, 400)]),
                           cfg, args)
    assert [t["met"] for t in met] == [True, True]
    missed = evaluate_targets(with_speedups([row("llmdrop_rt", 0, 2.0, 400), row("llmdrop_rt", 15, 1.9, 201),
                                             row("transformers", 0, 3.0, 400), row("transformers", 15, 2.0, 400)]),
                              cfg, args)
    assert [t["met"] for t in missed] == [False, False]
    paper = evaluate_targets(with_speedups([row("llmdrop_rt", 0, 10.0, 4), row("llmdrop_rt", 20, 7.0, 2)]),
                             model_config("llama-2-13b"), argparse.Namespace(synthetic="llama-2-13b"))
    assert paper[-1]["baseline"] == 1.40 and paper[-1]["met"] is True  # 10/7 = 1.43 > 1.40


def test_context_sweep_keeps_lengths_the_model_allows():
    parser = argparse.ArgumentParser()
    bench_args = ["--sweep", "--sweeps", "context", "--synthetic", "llama-2-13b", "--sweep-contexts",
                  "128,2048,4096,8192", "--new-tokens", "16", "--device", "cpu"]
    parser.add_argument("--model"), parser.add_argument("--dtype"), parser.add_argument("--device")
    parser.add_argument("--threads", type=int, default=1), parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--new-tokens", type=int), parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--no-transformers", action="store_true")
    sweeps.add_arguments(parser)
    args = parser.parse_args(bench_args)
    jobs = plan_jobs(args, model_config("llama-2-13b"))  # context 4096: 128, 2048 fit; 4096+16 does not
    assert sorted({j["prompt_len"] for j in jobs}) == [128, 2048]
    assert {j["drop_count"] for j in jobs} == {0, 20}


def test_tiny_sweep_end_to_end(tiny_checkpoints, tmp_path):
    out = tmp_path / "sweep"
    bench_main(["--model", str(tiny_checkpoints["llama3"]), "--sweep", "--sweeps", "drop,context",
                "--drop-counts", "0,3", "--e2e-len", "6", "--sweep-contexts", "8,32", "--new-tokens", "3",
                "--repeats", "1", "--threads", "1", "--sweep-dir", str(out)])
    report = json.loads((out / "sweep.json").read_text())
    drop = [r for r in report["rows"] if r["sweep"] == "drop"]
    assert [(r["impl"], r["drop_count"]) for r in drop] == [("llmdrop_rt", 0), ("llmdrop_rt", 3),
                                                            ("transformers", 0), ("transformers", 3)]
    ours_full, ours_half = drop[0], drop[1]
    assert ours_half["kv_bytes"] * 2 == ours_full["kv_bytes"]  # 6 layers, 3 attention layers dropped
    assert all(r["e2e_cpu_s"] > 0 and r["cpu_speedup"] > 0 for r in report["rows"])
    # transformers' skipped layers never write their cache: what it held is measured, not assumed. It holds
    # prompt + new - 1 positions (the last token is never fed back); our cache is allocated for prompt + new.
    assert drop[3]["kv_bytes"] * 2 == drop[2]["kv_bytes"]
    assert drop[2]["kv_bytes"] * 12 == ours_full["kv_bytes"] * 11
    assert all(r["e2e_s"] > 0 and r["prefill_tok_s"] > 0 for r in report["rows"])
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {"attn-3 (50%) end-to-end speedup"}
    assert "## Dropped attention layers" in (out / "sweep.md").read_text()
    assert (out / "speedup_vs_dropped.png").stat().st_size > 1000
    assert (out / "kv_and_decode_vs_context.png").stat().st_size > 1000


def test_rounds_merge_to_medians():
    rounds = [dict(prefill_tok_s=10.0, decode_tok_s_b1=5.0, weight_bytes=7, peak_memory_bytes=3),
              dict(prefill_tok_s=30.0, decode_tok_s_b1=1.0, weight_bytes=7, peak_memory_bytes=9),
              dict(prefill_tok_s=20.0, decode_tok_s_b1=4.0, weight_bytes=7, peak_memory_bytes=5)]
    merged = median_of_rounds(rounds)
    assert (merged["prefill_tok_s"], merged["decode_tok_s_b1"]) == (20.0, 4.0)
    assert (merged["weight_bytes"], merged["peak_memory_bytes"]) == (7, 9) and merged["rounds"] == rounds


def test_quick_bench_runs_rounds_round_robin(tiny_checkpoints, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    bench_main(["--model", str(tiny_checkpoints["llama3"]), "--drop", "0,0.5", "--no-transformers", "--rounds", "2",
                "--repeats", "1", "--prompt-len", "8", "--new-tokens", "4", "--batch-sizes", "1", "--threads", "1",
                "--weights", "fp32,int8", "--peers", "none", "--out", str(out), "--plot", str(png)])
    report = json.loads(out.read_text())
    assert [r["label"] for r in report["rows"]] == ["llmdrop_rt fp32 attn-0 t1", "llmdrop_rt fp32 attn-3 t1",
                                                    "llmdrop_rt int8 attn-0 t1", "llmdrop_rt int8 attn-3 t1"]
    assert all(len(r["rounds"]) == 2 and r["decode_tok_s_b1"] > 0 for r in report["rows"])
    assert report["rows"][1]["kv_bytes_b1"] * 2 == report["rows"][0]["kv_bytes_b1"]
    assert report["rows"][2]["weight_bytes"] < report["rows"][0]["weight_bytes"] / 3  # int8 blocks vs fp32
    assert report["read_bandwidth_bytes_s"]["1"] > 1e8
    assert "decode batch 1, tokens/s" in capsys.readouterr().out and png.stat().st_size > 1000
