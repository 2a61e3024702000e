"""The batch-1 decode ceiling of this machine: one fp32 GEMV over every weight matrix a decode step must read.

A decode step at batch 1 reads every kept weight once (q|k|v, o, gate|up, down per layer, and the lm_head); on a CPU
that is memory-bound, so timing exactly those GEMVs back to back -- nothing else: no norms, rope, attention,
sampling or Python -- gives the fastest decode any runtime can reach with these weights here. The same run times
our real decode step, so the ratio shows how much of a step is the floor and how much is everything else.

    python bench/bench_decode_floor.py [--model DIR] [--drop-attn 14-28] [--threads 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import llmdrop_rt
from llmdrop_rt.bench.baselines import timed_generation
from llmdrop_rt.config import parse_layer_list


def weight_matrices(llm) -> list[torch.Tensor]:
    """The dense 2-D weights one decode step reads, each once (the tied embedding counts as the lm_head)."""
    model = llm.model
    head = model.lm_head if model.lm_head is not None else model.embed.weight
    layers = [m.weight for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return layers + [head]


def seconds_per_pass(matrices: list[torch.Tensor], repeats: int) -> list[float]:
    x = {m.shape[1]: torch.randn(1, m.shape[1]) for m in matrices}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for m in matrices:
            F.linear(x[m.shape[1]], m)
        times.append(time.perf_counter() - start)
    return times


def seconds_per_decode_token(llm, new_tokens: int) -> float:
    """One decode step of our engine at batch 1 (first to last generated token, over `new_tokens` steps)."""
    prompt = [list(range(100, 228))]
    return timed_generation(llm, prompt, new_tokens + 1, torch.device("cpu"))[1] / new_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--drop-attn", type=parse_layer_list, default=None, metavar="LAYERS")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, interleaved (default: 7)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens per round (default: 32)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    llm = llmdrop_rt.load(args.model, drop_attn=args.drop_attn, dtype="float32", device="cpu")
    matrices = weight_matrices(llm)
    weight_bytes = sum(m.numel() * m.element_size() for m in matrices)
    seconds_per_decode_token(llm, 2)  # warm up
    floor, step = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        floor.append(min(seconds_per_pass(matrices, 3)))
        step.append(seconds_per_decode_token(llm, args.new_tokens))
    floor_s, step_s = statistics.median(floor), statistics.median(step)
    result = {
        "model": str(llm.folder), "drop_attn": args.drop_attn or [], "threads": args.threads,
        "torch": torch.__version__, "weight_matrices": len(matrices), "weight_bytes": weight_bytes,
        "gemv_floor_ms": floor_s * 1e3, "read_gb_per_s": weight_bytes / floor_s / 1e9,
        "ceiling_tok_per_s": 1 / floor_s, "our_step_ms": step_s * 1e3, "our_tok_per_s": 1 / step_s,
        "our_step_over_floor": step_s / floor_s,
    }
    print(f"{len(matrices)} weight matrices, {weight_bytes / 1e6:.0f} MB, {args.threads} threads")
    print(f"GEMV floor   {result['gemv_floor_ms']:6.1f} ms/token  ({result['read_gb_per_s']:.1f} GB/s) "
          f"-> ceiling {result['ceiling_tok_per_s']:.1f} tok/s")
    print(f"our decode   {result['our_step_ms']:6.1f} ms/token  -> {result['our_tok_per_s']:.1f} tok/s "
          f"({result['our_step_over_floor']:.2f}x the floor)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
