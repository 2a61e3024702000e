"""Speed bench: our full and attention-dropped model at every weight format, vs transformers and llama.cpp.

    python -m llmdrop_rt.bench                                  # embedded SmolLM2-135M-Instruct, about 2 minutes
    python -m llmdrop_rt.bench --threads 1,2 --rounds 3         # both thread counts, configurations round-robin
    python -m llmdrop_rt.bench --model DIR --dtype bfloat16 --drop 0,0.25,0.5 --batch-sizes 1,8   # a GPU

On a CPU every weight format of ours runs (`--weights`, default fp32,fp16,bf16,int8,int4), full and with half the
attention layers dropped (`--drop`), next to transformers in fp32 and, when `make peers` has built it, llama.cpp on
the same weights at the same precision (GGUF files written by our own exporter; `--peers none` leaves it out). On
a GPU the rows are ours in `--dtype` (with and without Triton kernels / CUDA graphs) and transformers.

Each configuration of ours and of transformers runs in its own subprocess with the same thread count, so peak
memory is its own and no configuration warms caches for another; llama.cpp runs as llama-bench. Reported per
configuration: prefill tokens/s (the prompt of the smallest batch), decode tokens/s per batch size (first to last
generated token), weight bytes, KV-cache bytes, peak memory (GPU: max allocated; CPU: peak RSS, which includes the
Python/torch runtime). On a CPU the read bandwidth of large reads of 1 GiB (see `read_bandwidth`) is measured at
each thread count, and each row's decode speed is shown against the floor it implies (weight bytes per token / read
bandwidth).
`--rounds` runs everything round-robin and reports medians, so a machine whose speed drifts slows all rows alike.
Prints tables, writes JSON (`--out`) and a PNG of decode speed by precision (`--plot`, needs matplotlib).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from ..config import ModelConfig
from ..io.publish import write_json
from ..quant import cpu_linear
from .baselines import attention_layers_to_drop
from .worker import run_in_subprocess

CPU_WEIGHTS = ("fp32", "fp16", "bf16", "int8", "int4")


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes per second of the fastest of `repeats` reads of a buffer far larger than the caches: the faster of
    torch's `.sum()` (one sequential stream per thread) and, when the extension is built, our kernels' read
    pattern (`read_sum`: several distant stretches per thread in turn, which a core reads markedly faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(nbytes // 4)
        reads = [data.sum] + ([lambda: cpu_linear.ops.read_sum(data)] if cpu_linear.ops is not None else [])
        best = float("inf")
        for _ in range(repeats):
            for read in reads:
                t0 = time.perf_counter()
                read()
                best = min(best, time.perf_counter() - t0)
        return nbytes / best
    finally:
        torch.set_num_threads(previous)


def median_of_rounds(rounds: list[dict]) -> dict:
    """One row from several rounds of a configuration: median speeds, largest peak memory, every round kept."""
    merged = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if "_tok_s" in key}
    merged.update({key: max(r[key] for r in rounds) for key in rounds[0] if key not in merged})
    merged["rounds"] = rounds
    return merged


def row_from_measure(measured: dict) -> dict:
    """The bench's figures from one worker measurement: prefill at the smallest batch, decode per batch."""
    batches = measured["batches"]
    row = {"prefill_tok_s": batches[min(batches, key=int)]["prefill_tok_s"]}
    for batch, timing in batches.items():
        row[f"decode_tok_s_b{batch}"] = timing["decode_tok_s"]
        row[f"kv_bytes_b{batch}"] = timing["kv_bytes"]
    row["weight_bytes"], row["peak_memory_bytes"] = measured["weight_bytes"], measured["peak_memory_bytes"]
    return row


def plan_jobs(args, cfg) -> list[dict]:
    """Every configuration the run measures, ours and transformers (llama.cpp rows are planned by bench.llama_cpp)."""
    cpu = args.device == "cpu"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    common = dict(model=args.model, dtype=args.dtype, device=args.device, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, repeats=args.repeats, batch_sizes=batch_sizes, kv_cache=args.kv_cache)
    formats = [w.strip() for w in args.weights.split(",")] if cpu else [None]
    jobs = []
    for threads in args.thread_counts:
        for weights in formats:
            for fraction in [float(f) for f in args.drop.split(",")]:
                drop = attention_layers_to_drop(cfg.num_layers, fraction)
                jobs.append(dict(common, impl="llmdrop_rt", weights=weights, threads=threads, drop_attn=drop,
                                 precision=weights or args.dtype, kernels="auto", decode="auto"))
        if not cpu:  # what the fused kernels and CUDA graphs buy, on the full model
            jobs.append(dict(common, impl="llmdrop_rt", weights=None, threads=threads, drop_attn=[],
                             precision=f"{args.dtype}, torch ops, no graphs", kernels="torch", decode="dynamic"))
        if not args.no_transformers:
            jobs.append(dict(common, impl="transformers", threads=threads, drop_attn=[], precision=args.dtype))
    for job in jobs:
        job["label"] = f"{job['impl']} {job['precision']} attn-{len(job['drop_attn'])} t{job['threads']}"
    return jobs


def format_tables(rows: list[dict], batch_sizes: list[int], num_layers: int, bandwidth: dict) -> str:
    """A summary (decode batch 1 by precision: ours full / dropped vs the peers) and every row in detail."""
    def find(impl, precision, threads, dropped):
        return next((r for r in rows if r["impl"] == impl and r["precision"] == precision and
                     r["threads"] == threads and bool(r["drop_attn"]) == dropped), None)

    b = batch_sizes[0]
    key = f"decode_tok_s_b{b}"
    head = ["threads", "precision", "ours", "ours, attn dropped (speedup / byte ratio)", "llama.cpp",
            "llama.cpp, attn dropped", "ours / llama.cpp", "transformers", "% of read floor"]
    lines = [f"decode batch {b}, tokens/s", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for threads in sorted({r["threads"] for r in rows}):
        for precision in dict.fromkeys(r["precision"] for r in rows if r["impl"] == "llmdrop_rt"):
            full, dropped = find("llmdrop_rt", precision, threads, False), find("llmdrop_rt", precision, threads, True)
            peer, peer_dropped = (find("llama.cpp", precision, threads, d) for d in (False, True))
            hf = find("transformers", precision, threads, False)
            if full is None:
                continue
            cells = [str(threads), precision, f"{full[key]:.1f}"]
            cells.append("-" if dropped is None else f"{dropped[key]:.1f} ({dropped[key] / full[key]:.2f}x / "
                                                      f"{full['weight_bytes'] / dropped['weight_bytes']:.2f}x)")
            cells += ["-" if p is None else f"{p[key]:.1f}" for p in (peer, peer_dropped)]
            cells.append("-" if peer is None else f"{full[key] / peer[key]:.2f}x")
            cells.append("-" if hf is None else f"{hf[key]:.1f}")
            floor = bandwidth.get(threads)
            cells.append("-" if floor is None else f"{full[key] * full['weight_bytes'] / floor:.0%}")
            lines.append("| " + " | ".join(cells) + " |")
    head = ["config", "attn kept", "prefill tok/s"] + [f"decode b{b} tok/s" for b in batch_sizes] + [
        "weights MB", f"KV MB (b{batch_sizes[-1]})", "peak MB"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{num_layers - len(r['drop_attn'])}/{num_layers}", f"{r['prefill_tok_s']:.0f}"]
        cells += [f"{r[f'decode_tok_s_b{b}']:.1f}" if f"decode_tok_s_b{b}" in r else "-" for b in batch_sizes]
        cells.append(f"{r['weight_bytes'] / 2**20:.1f}")
        kv, peak = r.get(f"kv_bytes_b{batch_sizes[-1]}"), r.get("peak_memory_bytes")
        cells += ["-" if kv is None else f"{kv / 2**20:.2f}", "-" if peak is None else f"{peak / 2**20:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({f"{row['label']}: {row['peer_note']}" for row in rows if row.get("peer_note")})
    if notes:
        lines += [""] + notes
    if bandwidth:
        lines += ["", "read bandwidth (the faster of two ways to read 1 GiB, see read_bandwidth): " +
                  ", ".join(f"{t} thread(s) {bw / 1e9:.1f} GB/s" for t, bw in sorted(bandwidth.items()))]
    return "\n".join(lines)


def plot_decode(rows: list[dict], batch: int, path) -> bool:
    """Grouped bars: decode tok/s by precision, ours vs llama.cpp, full and dropped, one panel per thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'llmdrop-rt[plot]')", file=sys.stderr)
        return False
    from ..io.publish import replacing

    thread_counts = sorted({r["threads"] for r in rows})
    precisions = list(dict.fromkeys(r["precision"] for r in rows if r["impl"] == "llmdrop_rt"))
    series = [(impl, dropped) for impl in ("llmdrop_rt", "llama.cpp") for dropped in (False, True)]
    fig, axes = plt.subplots(1, len(thread_counts), figsize=(5 * len(thread_counts), 4), squeeze=False)
    width = 0.8 / len(series)
    for ax, threads in zip(axes[0], thread_counts):
        for k, (impl, dropped) in enumerate(series):
            values = [next((r[f"decode_tok_s_b{batch}"] for r in rows if r["impl"] == impl and
                            r["precision"] == p and r["threads"] == threads and bool(r["drop_attn"]) == dropped), 0)
                      for p in precisions]
            if any(values):
                label = ("ours" if impl == "llmdrop_rt" else impl) + (", attn dropped" if dropped else "")
                ax.bar([i + k * width for i in range(len(precisions))], values, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(precisions))], precisions)
        ax.set(ylabel=f"decode tok/s (batch {batch})", title=f"{threads} thread(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def environment(device: str, threads) -> dict:
    import platform

    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "device": device}
    if device == "cpu":
        env["cpu_kernels"] = cpu_linear.kernel_isa()
        env["dense_prefill_gemm"] = cpu_linear.dense_gemm()
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def run(args, argv) -> None:
    """The quick bench (see the module docstring)."""
    from tqdm.auto import tqdm

    from . import llama_cpp

    cfg = ModelConfig.from_folder(args.model)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    jobs = plan_jobs(args, cfg)
    peers = llama_cpp.plan_peer_jobs(args, cfg) if args.device == "cpu" else []
    bandwidth = {t: read_bandwidth(t) for t in args.thread_counts} if args.device == "cpu" else {}
    results = {job["label"]: [] for job in jobs + peers}
    with tqdm(total=args.rounds * len(jobs + peers), desc="bench", unit="config") as bar:
        for _ in range(args.rounds):  # round-robin: a machine whose speed drifts slows every config alike
            for job in jobs + peers:
                bar.set_postfix_str(job["label"])
                if job["impl"] == "llama.cpp":
                    try:
                        results[job["label"]].append(llama_cpp.measure(job))
                    except RuntimeError as failure:  # a peer that cannot run leaves its row out, not the bench
                        print(f"\n{job['label']} left out: {failure}", file=sys.stderr)
                else:
                    results[job["label"]].append(row_from_measure(run_in_subprocess(job)))
                bar.update()
    rows = [dict(label=job["label"], impl=job["impl"], precision=job["precision"], threads=job["threads"],
                 drop_attn=job["drop_attn"], **median_of_rounds(results[job["label"]]))
            for job in jobs + peers if results[job["label"]]]
    tables = format_tables(rows, batch_sizes, cfg.num_layers, bandwidth)
    if args.device == "cpu":
        peer_kv = f" (llama.cpp: {peers[0]['kv_type']})" if peers else ""
        kernels = f"our CPU kernels: {cpu_linear.kernel_isa()} (dense prefill GEMM: {cpu_linear.dense_gemm()})"
        tables = f"{kernels}; KV cache: {args.kv_cache}{peer_kv}\n" + tables
    print(tables)
    report = {"command": "python -m llmdrop_rt.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(args.device, args.thread_counts), "model": args.model,
              "read_bandwidth_bytes_s": bandwidth, "rows": rows, "tables": tables,
              "llama_cpp": llama_cpp.describe(peers)}
    print(f"wrote {write_json(args.out, report)}", file=sys.stderr)
    if args.plot and plot_decode(rows, batch_sizes[0], args.plot):
        print(f"wrote {args.plot}", file=sys.stderr)
