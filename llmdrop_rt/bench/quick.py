"""Speed bench: the full model vs the same model with attention layers dropped vs transformers, in one run.

    python -m llmdrop_rt.bench                      # embedded SmolLM2-135M-Instruct, fp32, CPU or GPU
    python -m llmdrop_rt.bench --model DIR --dtype bfloat16 --drop 0,0.25,0.5 --batch-sizes 1,8

Every configuration runs in its own subprocess with the same thread count, so peak memory is its own and no
configuration warms caches for another. Reported per configuration: prefill tokens/s (batch 1), decode tokens/s
per batch size (time from the first to the last generated token), peak memory (GPU: max allocated; CPU: peak
RSS of the process, which includes the Python/torch runtime), weight bytes, KV-cache bytes for the run.
On CUDA one more row runs the full model with plain torch ops and no CUDA graphs, to show what the Triton
kernels and graph replay buy. The configurations run round-robin `--rounds` times (each run keeping the best of
`--repeats`) and the table shows the median over rounds, so a machine whose speed drifts during the bench -- a
shared 2-core CPU does -- slows every configuration alike. Ratios are against our full model in the same run.
Prints a table and writes JSON (every round's figures included).
"""
from __future__ import annotations

import statistics
import sys

from ..config import ModelConfig
from ..io.publish import write_json
from .baselines import attention_layers_to_drop
from .worker import run_in_subprocess


def median_of_rounds(rounds: list[dict]) -> dict:
    """One row from several rounds of a configuration: median speeds, largest peak memory, every round kept."""
    merged = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if "_tok_s" in key}
    merged.update({key: max(r[key] for r in rounds) for key in rounds[0] if key not in merged})
    merged["rounds"] = rounds
    return merged


def format_table(rows: list[dict], batch_sizes: list[int]) -> str:
    base = next(r for r in rows if r["impl"] == "llmdrop_rt" and not r["drop_attn"])
    head = ["config", "attn kept", "prefill tok/s"] + [f"decode b{b} tok/s (x)" for b in batch_sizes] + [
        "weights MB", f"KV MB (b{batch_sizes[-1]})", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['attn_kept']}/{r['num_layers']}", f"{r['prefill_tok_s']:.0f}"]
        for b in batch_sizes:
            v = r[f"decode_tok_s_b{b}"]
            cells.append(f"{v:.1f} ({v / base[f'decode_tok_s_b{b}']:.2f}x)")
        cells += [f"{r['weight_bytes'] / 2**20:.1f}", f"{r[f'kv_bytes_b{batch_sizes[-1]}'] / 2**20:.2f}",
                  f"{r['peak_memory_bytes'] / 2**20:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment(device: str, threads: int) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def row_from_measure(measured: dict) -> dict:
    """The quick bench's figures from one worker measurement: prefill at the smallest batch, decode per batch."""
    batches = measured["batches"]
    row = {"prefill_tok_s": batches[min(batches, key=int)]["prefill_tok_s"]}
    for batch, timing in batches.items():
        row[f"decode_tok_s_b{batch}"] = timing["decode_tok_s"]
        row[f"kv_bytes_b{batch}"] = timing["kv_bytes"]
    row["weight_bytes"], row["peak_memory_bytes"] = measured["weight_bytes"], measured["peak_memory_bytes"]
    return row


def run(args, argv) -> None:
    """The quick bench: our full and attention-dropped model vs transformers, configurations round-robin."""
    cfg = ModelConfig.from_folder(args.model)
    device, dtype = args.device, args.dtype
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    common = dict(model=args.model, dtype=dtype, device=device, threads=args.threads, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, repeats=args.repeats, rounds=args.rounds, batch_sizes=batch_sizes)
    jobs = []
    for fraction in [float(f) for f in args.drop.split(",")]:
        drop = attention_layers_to_drop(cfg.num_layers, fraction)
        jobs.append(dict(common, impl="llmdrop_rt", drop_attn=drop, label=f"llmdrop_rt attn-{len(drop)}",
                         kernels="auto", decode="auto"))
    if device.startswith("cuda"):  # what the fused kernels and CUDA graphs buy, on the full model
        jobs.append(dict(common, impl="llmdrop_rt", drop_attn=[], label="llmdrop_rt attn-0 torch ops, no graphs",
                         kernels="torch", decode="dynamic"))
    if not args.no_transformers:
        jobs.append(dict(common, impl="transformers", drop_attn=[], label="transformers"))
        half = attention_layers_to_drop(cfg.num_layers, 0.5)
        jobs.append(dict(common, impl="transformers", drop_attn=half, label=f"transformers skip attn-{len(half)}"))
    results = {job["label"]: [] for job in jobs}
    for round_index in range(args.rounds):  # round-robin: a machine whose speed drifts slows every config alike
        for job in jobs:
            print(f"round {round_index + 1}/{args.rounds}: running {job['label']} ...", file=sys.stderr, flush=True)
            results[job["label"]].append(row_from_measure(run_in_subprocess(job)))
    rows = [dict(label=job["label"], impl=job["impl"], drop_attn=job["drop_attn"],
                 attn_kept=cfg.num_layers - len(job["drop_attn"]), num_layers=cfg.num_layers,
                 **median_of_rounds(results[job["label"]])) for job in jobs]
    table = format_table(rows, batch_sizes)
    print(table)
    report = {"command": "python -m llmdrop_rt.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(device, args.threads), "settings": common, "rows": rows, "table": table}
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)
