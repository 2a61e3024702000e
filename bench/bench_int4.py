"""int4 linear vs dense linear at SmolLM2-135M and Llama-7B projection shapes, same machine, same run.

By default each timed call uses the next of enough copies of the layer to exceed the caches, so weights come from
memory as in a decode step; --warm times one copy in a loop instead (small layers then run from cache).

CPU: the C++ int4 kernel (llmdrop_rt._int4_cpu) vs fp32 torch.nn.functional.linear (dense weights
equal to the dequantized int4 ones, group size 128).
CUDA (when a GPU is present): QuantLinear's CUDA path on fp16 activations -- the CUDA extension's GEMV up to
8 rows, the Triton tensor-core GEMM (kernels/int4_gemm.py) above -- vs fp16 F.linear, and the fp32 comparison too.
Prints a table; --out writes the rows as JSON.

    python bench/bench_int4.py --out bench/out/int4_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import itertools
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from llmdrop_rt.io.publish import write_json
from llmdrop_rt.quant import linear
from llmdrop_rt.quant.formats import Int4Weights, dequantize_reference
from llmdrop_rt.quant.linear import QuantLinear

SHAPES = {  # model -> [(name, out_features, in_features)]
    "SmolLM2-135M": [("q_proj", 576, 576), ("up_proj", 1536, 576), ("down_proj", 576, 1536)],
    "Llama-7B": [("q_proj", 4096, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)],
}
GROUP_SIZE = 128
COLD_BYTES = 256 * 2**20  # dense fp32 copies of a layer, in total, in the (default) cold mode


def random_layer(out_features: int, in_features: int, device: torch.device) -> tuple[QuantLinear, torch.Tensor]:
    groups = in_features // GROUP_SIZE if in_features % GROUP_SIZE == 0 else -(-in_features // GROUP_SIZE)
    weights = Int4Weights(
        torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8),
        torch.randint(0, 16, (groups, out_features), dtype=torch.int16),
        (torch.rand(groups, out_features) * 0.01 + 0.001).half(),
        torch.arange(in_features) // GROUP_SIZE,
    )
    layer = QuantLinear.from_int4(weights, GROUP_SIZE).to(device)
    return layer, dequantize_reference(weights).to(device)


def seconds_per_call(fns, device: torch.device, min_time: float = 0.6,
                     min_samples: int = 7) -> list[tuple[float, float]]:
    """(median, best) wall time of one call of each function. Samples of the functions alternate, so a
    machine whose load drifts (shared runners) slows them alike; the best sample estimates the
    unloaded speed."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    calls_per_sample = []
    for fn in fns:
        for _ in range(3):
            fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        calls_per_sample.append(max(1, int(0.02 / max(time.perf_counter() - start, 1e-6))))
    samples = [[] for _ in fns]
    elapsed = 0.0
    while elapsed < min_time or len(samples[0]) < min_samples:
        for fn, calls, times in zip(fns, calls_per_sample, samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            took = time.perf_counter() - start
            times.append(took / calls)
            elapsed += took
    return [(statistics.median(times), min(times)) for times in samples]


def rotating(copies: list) -> Callable[[], object]:
    """Each call returns the next of `copies`, round and round."""
    state = itertools.cycle(copies)
    return lambda: next(state)


def bench(device: torch.device, rows_list: list[int], models: list[str], cold: bool = True) -> list[dict]:
    results = []
    for model in models:
        for name, out_features, in_features in SHAPES[model]:
            layer, weight32 = random_layer(out_features, in_features, device)
            # Cold: cycle through copies of the layer that together exceed any cache, so every call reads its
            # weights from memory, as a decode step does (a small layer called in a loop stays cache-resident).
            copies = max(1, -(-COLD_BYTES // (weight32.numel() * 4))) if cold else 1
            layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1)]
            comparisons = [("fp32", torch.float32, weight32)]
            if device.type == "cuda":
                comparisons.append(("fp16", torch.float16, weight32.half()))
            for rows in rows_list:
                for label, dtype, dense_weight in comparisons:
                    x = torch.randn(rows, in_features, device=device, dtype=dtype)
                    next_layer = rotating(layers)
                    next_weight = rotating([dense_weight] + [dense_weight.clone() for _ in range(copies - 1)])
                    with torch.inference_mode():
                        err = (layer(x).float() - F.linear(x, dense_weight).float()).abs().max().item()
                        (t_int4, best_int4), (t_dense, best_dense) = seconds_per_call(
                            [lambda: next_layer()(x), lambda: F.linear(x, next_weight())], device)
                    results.append({
                        "model": model, "layer": name, "out_features": out_features, "in_features": in_features,
                        "rows": rows, "activations": label, "backend": layer.backend_for(x), "copies": copies,
                        "int4_ms": t_int4 * 1e3, "dense_ms": t_dense * 1e3, "speedup_vs_dense": t_dense / t_int4,
                        "int4_best_ms": best_int4 * 1e3, "dense_best_ms": best_dense * 1e3,
                        "best_speedup_vs_dense": best_dense / best_int4, "max_abs_diff": err,
                        "int4_weight_bytes": layer.weight_bytes(),
                        "dense_weight_bytes": dense_weight.numel() * dense_weight.element_size(),
                    })
                    r = results[-1]
                    print(f"{model:13s} {name:10s} {out_features:6d}x{in_features:<6d} rows={rows:<4d} {label} "
                          f"{r['backend']:9s} median: int4 {r['int4_ms']:8.3f} ms dense {r['dense_ms']:8.3f} ms "
                          f"dense/int4 {r['speedup_vs_dense']:5.2f}x | best: int4 {r['int4_best_ms']:8.3f} ms "
                          f"dense {r['dense_best_ms']:8.3f} ms dense/int4 {r['best_speedup_vs_dense']:5.2f}x  "
                          f"maxdiff {err:.1e}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warm", action="store_true",
                        help="call one copy of each layer over and over (its weights stay in cache) instead of "
                             "cycling through copies larger than the caches (default: cold, as in decode)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} backends={linear.available_backends()}"
          + (f" cpu_simd_bits={linear._int4_cpu.simd_width()}" if linear._int4_cpu is not None else ""))
    results = bench(device, args.rows, args.models, cold=not args.warm)
    if args.out:
        report = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "group_size": GROUP_SIZE,
            "weights": "warm (one copy, cache-resident)" if args.warm else f"cold (copies > {COLD_BYTES >> 20} MiB)",
            "backends": linear.available_backends(), "results": results,
        }
        print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
