"""Bench sweeps, profiling and the KV-cache table, reached through `python -m llmdrop_rt.bench`:

    python -m llmdrop_rt.bench --sweep                 # dropped attention 0..50%, context length, batch size
    python -m llmdrop_rt.bench --sweep --synthetic llama-2-13b --dtype bfloat16 --e2e-len 2048 --drop-counts 0,16,20
    python -m llmdrop_rt.bench --profile               # torch.profiler traces of prefill and decode
    python -m llmdrop_rt.bench --kv-table              # KV cache of big shapes, LLM-Drop Table 4 layout

The sweep runs every configuration in its own subprocess (same thread count) and times one generation per repeat
(the best repeat is kept): prefill = start to first token, decode = first to last token, end to end = both, for
a prompt and a generation of equal length (`--e2e-len`; the paper's setting is 2048 + 2048). Three sweeps:
- drop: fractions (or counts) of attention layers dropped in our runtime, and the same layers skipped in
  transformers' forward but still allocated (LLM-Drop's approach) as the baseline; speedups are end to end,
  each against its own implementation's full model;
- context: prompt lengths 128..8192 where the model allows (`--new-tokens` generated), full vs half dropped;
- batch: decode batch sizes, full vs half dropped.
`--synthetic NAME` uses random weights of a real shape (llmdrop_rt.bench.synthetic; labelled synthetic in every output).
Outputs in `--sweep-dir`: sweep.json, sweep.md, and PNG plots (matplotlib, the `plot` extra).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..io.publish import write_json, write_text
from .baselines import attention_layers_to_drop, deepest_attention_layers
from .worker import run_in_subprocess

DEFAULT_SWEEP_DIR = Path("bench/out/sweep")
PAPER_E2E = {"llama-2-13b": {16: 1.29, 20: 1.40}}  # LLM-Drop's reported speedups, Attn-n (2048+2048, A6000 Ada)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep/profile/KV-table options of `python -m llmdrop_rt.bench` (the default quick bench ignores them)."""
    group = parser.add_argument_group("sweeps, profiling, KV table (llmdrop_rt.bench.sweeps)")
    group.add_argument("--sweep", action="store_true",
                       help="run the drop / context / batch sweeps instead of the quick bench")
    group.add_argument("--profile", action="store_true",
                       help="profile prefill and decode of our model (Chrome traces, time by module kind)")
    group.add_argument("--kv-table", action="store_true",
                       help="print the KV-cache table for Mistral-7B, Llama-2-13B/70B, Llama-3-8B/70B shapes")
    group.add_argument("--synthetic", metavar="NAME",
                       help="use SYNTHETIC random weights of a known shape (see llmdrop_rt.synthetic.CONFIGS), "
                            "e.g. llama-2-13b; speed only, outputs meaningless")
    group.add_argument("--sweeps", default="drop,context,batch",
                       help="which sweeps to run (default: drop,context,batch)")
    group.add_argument("--sweep-drop", default="0,0.125,0.25,0.375,0.5",
                       help="fractions of attention layers to drop in the drop sweep (default: 0,0.125,0.25,0.375,0.5)")
    group.add_argument("--drop-counts", default=None,
                       help="numbers of attention layers to drop instead of fractions, e.g. 0,16,20")
    group.add_argument("--e2e-len", type=int, default=128,
                       help="prompt tokens = generated tokens in the drop sweep (default: 128; the paper: 2048)")
    group.add_argument("--e2e-batch", type=int, default=1, help="batch size of the drop sweep (default: 1)")
    group.add_argument("--sweep-contexts", default="128,512,2048,8192",
                       help="prompt lengths of the context sweep, kept where the model allows "
                            "(default: 128,512,2048,8192)")
    group.add_argument("--sweep-batches", default="1,4,16", help="batch sizes of the batch sweep (default: 1,4,16)")
    group.add_argument("--sweep-dir", type=Path, default=DEFAULT_SWEEP_DIR,
                       help="output folder for sweep JSON/markdown/PNGs or profile traces "
                            f"(default: {DEFAULT_SWEEP_DIR})")
    group.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# -- loading either a real checkpoint or a synthetic shape ---------------------------------------------------------
def model_config_of(args):
    """The config of --synthetic NAME, else of --model (the CLI resolves the default model's folder)."""
    from ..config import ModelConfig
    from .synthetic import model_config

    if args.synthetic:
        return model_config(args.synthetic)
    return ModelConfig.from_folder(args.model)


def run_profile(args) -> None:
    from .baselines import OursTimer
    from .profile import profile

    torch.set_num_threads(args.threads)
    cfg = model_config_of(args)
    device, dtype = args.device, args.dtype
    fractions = [float(f) for f in args.drop.split(",")]
    for fraction in (fractions if len(fractions) <= 2 else [fractions[0], fractions[-1]]):
        drop = attention_layers_to_drop(cfg.num_layers, fraction)
        job = dict(model=args.model, synthetic=args.synthetic, drop_attn=drop, dtype=dtype, device=device)
        llm = OursTimer(job).llm
        out_dir = args.sweep_dir / f"profile_attn-{len(drop)}"
        report = profile(llm, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         batch_size=int(args.batch_sizes.split(",")[0]), out_dir=out_dir)
        label = " (SYNTHETIC weights)" if args.synthetic else ""
        print(f"\n## attn-{len(drop)}{label}\n{report.format()}")
        del llm


# -- the sweeps -----------------------------------------------------------------------------------------------------
def _drop_counts(args, num_layers: int) -> list[int]:
    if args.drop_counts:
        counts = [int(c) for c in args.drop_counts.split(",")]
    else:
        counts = [len(attention_layers_to_drop(num_layers, float(f))) for f in args.sweep_drop.split(",")]
    bad = [c for c in counts if not 0 <= c < num_layers]
    if bad:
        raise ValueError(f"drop counts {bad} are out of range for {num_layers} attention layers")
    return sorted(set(counts))


def plan_jobs(args, cfg) -> list[dict]:
    common = dict(model=args.model, synthetic=args.synthetic, dtype=args.dtype, device=args.device,
                  threads=args.threads, repeats=args.repeats)
    sweeps = {s.strip() for s in args.sweeps.split(",") if s.strip()}
    unknown = sweeps - {"drop", "context", "batch"}
    if unknown:
        raise ValueError(f"unknown sweeps {sorted(unknown)}; choose from drop, context, batch")
    half = cfg.num_layers // 2
    jobs = []
    if "drop" in sweeps:
        if 2 * args.e2e_len > cfg.max_position_embeddings:
            raise ValueError(f"--e2e-len {args.e2e_len} + {args.e2e_len} exceeds the model's context of "
                             f"{cfg.max_position_embeddings}")
        impls = ["llmdrop_rt"] + ([] if args.no_transformers else ["transformers"])
        for impl in impls:
            for count in _drop_counts(args, cfg.num_layers):
                jobs.append(dict(common, sweep="drop", impl=impl, drop_count=count,
                                 drop_attn=deepest_attention_layers(cfg.num_layers, count), batch=args.e2e_batch,
                                 prompt_len=args.e2e_len, new_tokens=args.e2e_len))
    if "context" in sweeps:
        for length in (int(c) for c in args.sweep_contexts.split(",")):
            if length + args.new_tokens > cfg.max_position_embeddings:
                continue
            for count in (0, half):
                jobs.append(dict(common, sweep="context", impl="llmdrop_rt", drop_count=count,
                                 drop_attn=deepest_attention_layers(cfg.num_layers, count), batch=1, prompt_len=length,
                                 new_tokens=args.new_tokens))
    if "batch" in sweeps:
        for batch in (int(b) for b in args.sweep_batches.split(",")):
            for count in (0, half):
                jobs.append(dict(common, sweep="batch", impl="llmdrop_rt", drop_count=count,
                                 drop_attn=deepest_attention_layers(cfg.num_layers, count), batch=batch,
                                 prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens))
    for job in jobs:
        kind = "transformers skip" if job["impl"] == "transformers" else "llmdrop_rt"
        job["label"] = (f"{job['sweep']}: {kind} attn-{job['drop_count']} b{job['batch']} "
                        f"{job['prompt_len']}+{job['new_tokens']}")
    return jobs


def with_speedups(rows: list[dict]) -> list[dict]:
    """End-to-end speedup of each row against the undropped row of the same sweep, implementation, batch and
    lengths (so the transformers-skip rows are compared with transformers' own full model)."""
    for row in rows:
        key = (row["sweep"], row["impl"], row["batch"], row["prompt_len"], row["new_tokens"])
        base = next((r for r in rows if r["drop_count"] == 0 and
                     (r["sweep"], r["impl"], r["batch"], r["prompt_len"], r["new_tokens"]) == key), None)
        row["e2e_speedup"] = base["e2e_s"] / row["e2e_s"] if base else None
        row["cpu_speedup"] = base["e2e_cpu_s"] / row["e2e_cpu_s"] if base else None
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"] if base else None
        row["kv_ratio"] = row["kv_bytes"] / base["kv_bytes"] if base else None
    return rows


def evaluate_targets(rows: list[dict], cfg, args) -> list[dict]:
    """The speed goals the sweep reports on (drop speedup vs the skip baseline, KV halving, the paper's figure),
    checked on what this run measured."""
    targets = []
    drop_rows = [r for r in rows if r["sweep"] == "drop"]
    half = cfg.num_layers // 2
    ours = next((r for r in drop_rows if r["impl"] == "llmdrop_rt" and r["drop_count"] == half), None)
    skip = next((r for r in drop_rows if r["impl"] == "transformers" and r["drop_count"] == half), None)
    if ours and skip:
        targets.append({"target": f"attn-{half} (50%) end-to-end speedup: ours >= transformers-skip",
                        "ours": ours["e2e_speedup"], "baseline": skip["e2e_speedup"],
                        "met": ours["e2e_speedup"] >= skip["e2e_speedup"]})
        if ours["device"] == "cpu":
            targets.append({"target": f"attn-{half} (50%) speedup in process CPU time: ours >= transformers-skip",
                            "ours": ours["cpu_speedup"], "baseline": skip["cpu_speedup"],
                            "met": ours["cpu_speedup"] >= skip["cpu_speedup"]})
    full = next((r for r in drop_rows if r["impl"] == "llmdrop_rt" and r["drop_count"] == 0), None)
    if ours and full:
        kept = cfg.num_layers - half
        targets.append({"target": f"attn-{half} KV bytes exactly {kept}/{cfg.num_layers} of the full model's",
                        "ours": ours["kv_bytes"], "baseline": full["kv_bytes"],
                        "met": ours["kv_bytes"] * cfg.num_layers == full["kv_bytes"] * kept})
    for count, paper in PAPER_E2E.get(args.synthetic or "", {}).items():
        row = next((r for r in drop_rows if r["impl"] == "llmdrop_rt" and r["drop_count"] == count), None)
        if row:
            targets.append({"target": f"attn-{count} end-to-end speedup above LLM-Drop's {paper}x "
                                      f"({row['prompt_len']}+{row['new_tokens']}, {row['device']})",
                            "ours": row["e2e_speedup"], "baseline": paper, "met": row["e2e_speedup"] > paper})
    return targets


def format_markdown(report: dict) -> str:
    env, cfg = report["environment"], report["model"]
    lines = [f"# Bench sweep: {cfg['name']}" + (" (SYNTHETIC random weights)" if cfg["synthetic"] else ""),
             "", f"Command: `{report['command']}`", "",
             f"Machine: {env['device']} ({env['processor']}), torch {env['torch']}, {env['threads']} threads, "
             f"dtype {report['dtype']}. {cfg['num_layers']} layers.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    titles = {"drop": "Dropped attention layers (end to end, prompt + generation of equal length)",
              "context": "Context length (batch 1)", "batch": "Batch size"}
    for sweep in ("drop", "context", "batch"):
        rows = [r for r in report["rows"] if r["sweep"] == sweep]
        if not rows:
            continue
        lines += [f"## {titles[sweep]}", "",
                  "| impl | attn kept | batch | prompt+gen | prefill tok/s | decode tok/s | end-to-end s | "
                  "e2e speedup | e2e CPU s (speedup) | KV MiB | weights MiB | peak MiB | CPU/wall |",
                  "|" + "---|" * 13]
        for r in rows:
            impl = "transformers (skip)" if r["impl"] == "transformers" else "llmdrop_rt"
            speed = "-" if r["e2e_speedup"] is None else f"{r['e2e_speedup']:.2f}x"
            lines.append(f"| {impl} | {cfg['num_layers'] - r['drop_count']}/{cfg['num_layers']} | {r['batch']} | "
                         f"{r['prompt_len']}+{r['new_tokens']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                         f"{r['e2e_s']:.2f} | {speed} | {r['e2e_cpu_s']:.2f} ({r['cpu_speedup'] or 0:.2f}x) | "
                         f"{r['kv_bytes'] / 2**20:.1f} | "
                         f"{r['weight_bytes'] / 2**20:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                         f"{r['cpu_per_wall']:.2f} |")
        lines.append("")
    if report["targets"]:
        lines += ["## Targets", "", "| target | ours | baseline | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {t['ours']:.3f} | {t['baseline']:.3f} | {'yes' if t['met'] else 'NO'} |"
                         if isinstance(t["ours"], float) else
                         f"| {t['target']} | {t['ours']} | {t['baseline']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("PNG plots need matplotlib: pip install 'llmdrop-rt[plot]' (or pass --no-plots)") from None
    rows, n = report["rows"], report["model"]["num_layers"]
    tag = report["model"]["name"] + (" (synthetic)" if report["model"]["synthetic"] else "")
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    drop = [r for r in rows if r["sweep"] == "drop"]
    if drop:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, label in (("llmdrop_rt", "llmdrop_rt (modules absent)"),
                            ("transformers", "transformers (skipped, still allocated)")):
            pts = sorted((r["drop_count"], r["e2e_speedup"]) for r in drop if r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(xlabel=f"attention layers dropped (of {n})", ylabel="end-to-end speedup (x)")
        ax.set_title(f"{tag}\n{drop[0]['prompt_len']}+{drop[0]['new_tokens']} tokens, batch {drop[0]['batch']}",
                     fontsize=10)
        ax.legend()
        save(fig, "speedup_vs_dropped.png")
    context = [r for r in rows if r["sweep"] == "context"]
    if context:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for count in sorted({r["drop_count"] for r in context}):
            pts = sorted((r["prompt_len"] + r["new_tokens"], r["kv_bytes"] / 2**20, r["decode_tok_s"])
                         for r in context if r["drop_count"] == count)
            label = f"attention {n - count}/{n}"
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        ax1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB)",
                title=f"{tag}: KV bytes")
        ax2.set(xscale="log", xlabel="context (tokens)", ylabel="decode tok/s (batch 1)", title="decode speed")
        ax1.legend()
        ax2.legend()
        save(fig, "kv_and_decode_vs_context.png")
    batch = [r for r in rows if r["sweep"] == "batch"]
    if batch:
        fig, ax = plt.subplots(figsize=(6, 4))
        for count in sorted({r["drop_count"] for r in batch}):
            pts = sorted((r["batch"], r["decode_tok_s"]) for r in batch if r["drop_count"] == count)
            ax.plot(*zip(*pts), marker="o", label=f"attention {n - count}/{n}")
        ax.set(xscale="log", xlabel="batch size", ylabel="decode tok/s", title=f"{tag}: decode throughput")
        ax.legend()
        save(fig, "decode_vs_batch.png")
    return written


def sweep_row(job: dict, measured: dict) -> dict:
    """A sweep's figures from one worker measurement (a single batch size)."""
    timing = measured["batches"][str(job["batch"])]
    runs = timing["runs"]
    prefill_s, decode_s = timing["prefill_s"], timing["decode_s"]
    # On a shared CPU a process waits for cores: CPU seconds per wall second far below the thread count mark
    # inflated wall times. The least process CPU time over the repeats is then a steadier measure of the work
    # (with one thread it is the single-core time; it still includes cache and memory-bandwidth contention).
    return {**{k: job[k] for k in ("sweep", "impl", "drop_count", "drop_attn", "batch", "prompt_len", "new_tokens",
                                   "label", "device")},
            "prefill_s": prefill_s, "decode_s": decode_s, "e2e_s": prefill_s + decode_s,
            "cpu_per_wall": timing["cpu_s"] / (prefill_s + decode_s), "e2e_cpu_s": min(run[2] for run in runs),
            "repeats_e2e_s": [r[0] + r[1] for r in runs], "repeats_cpu_s": [r[2] for r in runs],
            "prefill_tok_s": timing["prefill_tok_s"], "decode_tok_s": timing["decode_tok_s"],
            "weight_bytes": measured["weight_bytes"], "peak_memory_bytes": measured["peak_memory_bytes"],
            "kv_bytes": timing["kv_bytes"]}


def run_sweeps(args, argv) -> None:
    from .quick import environment

    cfg = model_config_of(args)
    device, dtype = args.device, args.dtype
    rows = []
    for job in plan_jobs(args, cfg):
        print(f"running {job['label']} ...", file=sys.stderr, flush=True)
        job["batch_sizes"] = [job["batch"]]
        rows.append(sweep_row(job, run_in_subprocess(job)))
    rows = with_speedups(rows)
    name = args.synthetic or args.model_name or Path(args.model).name
    report = {"command": "python -m llmdrop_rt.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(device, args.threads), "dtype": dtype,
              "model": {"name": name, "synthetic": bool(args.synthetic), "num_layers": cfg.num_layers,
                        "source": None if args.synthetic else args.model},
              "rows": rows}
    if device == "cpu":
        report["note"] = (f"CPU/wall: process CPU seconds per wall second in the kept run; with {args.threads} "
                          f"thread(s), well below {args.threads} means the run waited for cores on a shared machine "
                          "and its wall times are inflated. e2e CPU s: the least process CPU time of the repeats "
                          "(steadier there; still includes cache/memory contention).")
    report["targets"] = evaluate_targets(rows, cfg, args)
    out_dir = args.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(report)
    write_json(out_dir / "sweep.json", report)
    write_text(out_dir / "sweep.md", markdown)
    print(markdown)
    if not args.no_plots:
        for path in plot(report, out_dir):
            print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {out_dir / 'sweep.json'} and sweep.md", file=sys.stderr)

