"""Decode-shaped CPU linear layers: our kernels per weight format vs torch's F.linear, with cold weights.

For every shape (SmolLM2-135M's projections, fused as a runtime would run them, and two Llama-7B ones), every weight
format of llmdrop_rt.quant.cpu_linear and every thread count, the timed call is the op
torch.ops.llmdrop_cpu_gemv.gemv_<fmt>
on the next of enough copies of the weight to exceed the caches (--cold-mib), so weights stream from memory as in a
decode step. torch's F.linear on fp32 weights (fp32 x) and on bf16 weights (bf16 x) run in the same rounds: the
candidates alternate within every round and each reports the median (and best) over rounds. GB/s counts weight
bytes. The floor is the read bandwidth of a 512 MiB tensor read the way the kernels read weights (the op
torch.ops.llmdrop_cpu_gemv.read_sum: several distant stretches per thread), timed as one more candidate in the
same rounds (so under the same machine load); /stream is a candidate's median GB/s over the floor's. `path` is what
CpuLinear would run for such a layer. `--simd 512 256` runs each format's kernels capped at each vector width
(AVX-512 VNNI, AVX2, 0 = portable) as candidates of the same rounds, named `<format>@<width>`.

    python bench/bench_cpu_gemv.py --threads 1 2 --out bench/out/cpu_gemv.json
    python bench/bench_cpu_gemv.py --threads 1 --rows 1 8 --formats q8_0 q4_0 --simd 512 256
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from llmdrop_rt.io.publish import write_json
from llmdrop_rt.quant import cpu_linear
from llmdrop_rt.quant.cpu_linear import CpuLinear

SHAPES = {  # model -> [(name, out_features, in_features)]
    "SmolLM2-135M": [("qkv_proj", 960, 576), ("o_proj", 576, 576), ("gate_up_proj", 3072, 576),
                     ("down_proj", 576, 1536), ("lm_head", 49152, 576)],
    "Llama-7B": [("q_proj", 4096, 4096), ("up_proj", 11008, 4096)],
}
TORCH_BASELINES = ("torch_f32", "torch_bf16")
STREAM_READ = "stream_read"
VECTOR_EXTENSIONS = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx_vnni"}


def sample_seconds(candidates: dict[str, Callable[[], object]], rounds: int,
                   sample_time: float) -> dict[str, tuple[float, float]]:
    """(median, best) seconds per call of each candidate over `rounds` rounds; within a round every candidate runs
    one sample of about `sample_time` seconds, so a drifting machine load slows them alike."""
    calls = {}
    for name, fn in candidates.items():
        fn(), fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(sample_time / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: (statistics.median(times), min(times)) for name, times in samples.items()}


def rotating(copies: list) -> Callable[[], object]:
    state = itertools.cycle(copies)
    return lambda: next(state)


def cold_copies(tensor: torch.Tensor, cold_bytes: int) -> list[torch.Tensor]:
    count = max(2, -(-cold_bytes // (tensor.numel() * tensor.element_size())))
    return [tensor] + [tensor.clone() for _ in range(count - 1)]


def bench_shape(model: str, name: str, out_features: int, in_features: int, formats: list[str], rows: int,
                threads: int, cold_bytes: int, rounds: int, sample_time: float, stream: torch.Tensor,
                simd_widths: list[int] | None = None) -> list[dict]:
    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    x = torch.randn(rows, in_features)
    candidates, weight_bytes, paths = {}, {}, {}
    for fmt in formats:
        held = cpu_linear.interleave(cpu_linear.quantize(weight, fmt), fmt)
        op = getattr(cpu_linear.ops, f"gemv_{fmt}")
        # Each width's candidate reads its own copies (one left in cache by another would flatter it) and sets its
        # cap before every call, so all of them pay that op call alike.
        for width in simd_widths or [None]:
            stored = cold_copies(held, cold_bytes)
            next_weight = rotating(stored)
            candidate = fmt if width is None else f"{fmt}@{width}"
            if width is None:
                candidates[candidate] = lambda op=op, next_weight=next_weight: op(x, next_weight())
            else:
                candidates[candidate] = lambda op=op, next_weight=next_weight, width=width: (
                    cpu_linear.ops.set_max_simd_bits(width), op(x, next_weight()))
            weight_bytes[candidate] = stored[0].numel() * stored[0].element_size()
            paths[candidate] = CpuLinear(stored[0], fmt, interleaved=True).path
    paths.update(dict.fromkeys(TORCH_BASELINES, "torch"))
    for baseline, dtype in zip(TORCH_BASELINES, (torch.float32, torch.bfloat16)):
        dense = cold_copies(weight.to(dtype), cold_bytes)
        next_dense = rotating(dense)
        xd = x.to(dtype)
        candidates[baseline] = lambda next_dense=next_dense, xd=xd: F.linear(xd, next_dense())
        weight_bytes[baseline] = dense[0].numel() * dense[0].element_size()
    candidates[STREAM_READ] = (lambda: cpu_linear.ops.read_sum(stream)) if cpu_linear.ops is not None else stream.sum
    weight_bytes[STREAM_READ] = stream.numel() * stream.element_size()
    with torch.inference_mode():
        seconds = sample_seconds(candidates, rounds, sample_time)
    if simd_widths:
        cpu_linear.ops.set_max_simd_bits(max(simd_widths))
    stream_gbs = weight_bytes[STREAM_READ] / seconds[STREAM_READ][0] / 1e9
    results = []
    for candidate, (t, best) in seconds.items():
        gbs = weight_bytes[candidate] / t / 1e9
        results.append({
            "model": model, "layer": name, "out_features": out_features, "in_features": in_features, "rows": rows,
            "threads": threads, "candidate": candidate, "path": paths.get(candidate, "-"),
            "us": t * 1e6, "us_best": best * 1e6, "weight_bytes": weight_bytes[candidate], "gbs": gbs,
            "gbs_best": weight_bytes[candidate] / best / 1e9, "of_stream_read": gbs / stream_gbs,
            "speedup_vs_torch_f32": seconds["torch_f32"][0] / t, "speedup_vs_torch_bf16": seconds["torch_bf16"][0] / t,
        })
    return results


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, CPU seconds of this one): their growth over a stretch of time
    tells how much other work shared the machine meanwhile (Linux; zeros elsewhere)."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return 0.0, 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, stat.read_text().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / hz, own.user + own.system


def machine() -> dict:
    """What the numbers ran on: CPU model and vector extensions, logical CPUs, memory (Linux)."""
    def read(path: str) -> str:
        return Path(path).read_text() if Path(path).exists() else ""

    cpu = {}
    for line in read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        cpu.setdefault(key.strip(), value.strip())  # the first CPU's entry
    memory = re.search(r"MemTotal:\s+(\d+) kB", read("/proc/meminfo"))
    return {"cpu": cpu.get("model name", platform.machine()), "cpu_family": cpu.get("cpu family"),
            "cpu_model": cpu.get("model"), "logical_cpus": os.cpu_count(),
            "vector_extensions": sorted(set(cpu.get("flags", "").split()) & VECTOR_EXTENSIONS),
            "memory_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None}


def print_table(results: list[dict]):
    print(f"{'shape':34s} {'rows':>4s} {'thr':>3s} {'format':10s} {'path':7s} {'us':>9s} {'GB/s':>6s} {'best':>6s} "
          f"{'/stream':>7s} {'vs f32':>7s} {'vs bf16':>7s}")
    for r in results:
        shape = f"{r['model']} {r['layer']} {r['out_features']}x{r['in_features']}"
        print(f"{shape:34s} {r['rows']:4d} {r['threads']:3d} {r['candidate']:10s} {r['path']:7s} {r['us']:9.1f} "
              f"{r['gbs']:6.1f} {r['gbs_best']:6.1f} {r['of_stream_read']:6.0%} {r['speedup_vs_torch_f32']:6.2f}x "
              f"{r['speedup_vs_torch_bf16']:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    parser.add_argument("--formats", nargs="+", default=list(cpu_linear.FORMATS), choices=cpu_linear.FORMATS)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--simd", type=int, nargs="+", choices=[512, 256, 0],
                        help="vector widths to compare, each format's kernels capped at each (default: the widest "
                             "this CPU has, alone)")
    parser.add_argument("--cold-mib", type=int, default=128,
                        help="the copies of each weight a candidate cycles through total at least this much")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample-time", type=float, default=0.02, help="seconds per candidate per round")
    parser.add_argument("--out", default="bench/out/cpu_gemv.json")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran)")
    args = parser.parse_args()
    if cpu_linear.ops is None:
        raise SystemExit("llmdrop_rt._cpu_gemv is not built (python setup.py build_ext --inplace)")

    widest = cpu_linear.ops.simd_width()
    for width in args.simd or []:
        if width > widest:
            raise SystemExit(f"--simd {width}: this CPU's kernels are at most {widest} bits wide")
    torch.manual_seed(0)
    load_at_start = os.getloadavg()
    stream = torch.ones(512 << 18)
    results, other_load = [], {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        (busy_start, own_start), wall_start = busy_cpu_seconds(), time.perf_counter()
        for model in args.models:
            for name, out_features, in_features in SHAPES[model]:
                for rows in args.rows:
                    rows_results = bench_shape(model, name, out_features, in_features, args.formats, rows, threads,
                                               args.cold_mib << 20, args.rounds, args.sample_time, stream,
                                               args.simd)
                    print_table(rows_results)
                    results += rows_results
        (busy_end, own_end), wall = busy_cpu_seconds(), time.perf_counter() - wall_start
        other_load[threads] = ((busy_end - busy_start) - (own_end - own_start)) / wall
        print(f"threads={threads}: other processes kept {other_load[threads]:.2f} CPUs busy meanwhile", flush=True)
    print_table(results)
    report = {
        "command": " ".join(["python", *sys.argv]), "note": args.note,
        "machine": {**machine(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "torch": torch.__version__, "simd_width": widest, "simd_widths_compared": args.simd,
        "weights": f"cold: each candidate cycles through copies totalling >= {args.cold_mib} MiB",
        "rounds": args.rounds,
        "other_processes_cpus_busy": other_load,  # per thread count, averaged over that part of the run
        "results": results,
    }
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
