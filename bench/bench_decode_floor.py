"""The batch-1 decode floor of this machine, next to what our decode step and the GEMVs inside it reach.

A decode step at batch 1 reads every kept weight once (q|k|v, o, gate|up, down per layer, and the output head), so
on a CPU its floor is (weight bytes per token) / (the machine's read bandwidth). The bandwidth is measured here
with large reads of a 1 GiB buffer (the same measure `python -m llmdrop_rt.bench` uses: the faster of torch's sum
and a read of several distant stretches per thread, as our kernels read weights), so the floor is the hardware's,
not any GEMV's. The same run times, interleaved round by round:
- one pass of torch's F.linear over the model's fp32 matrices (what a torch-only runtime's GEMVs cost),
- one pass of our own kernels over the matrices in the asked weight format (quant.cpu_linear),
- our real decode step in that format (first to last generated token).

    python bench/bench_decode_floor.py [--model DIR] [--weights fp32] [--drop-attn 14-28] [--threads 2] [--out F]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import llmdrop_rt
from llmdrop_rt.arguments import parse_layer_list
from llmdrop_rt.bench.baselines import timed_generation
from llmdrop_rt.bench.quick import read_bandwidth
from llmdrop_rt.io.publish import write_json
from llmdrop_rt.quant.cpu_linear import CpuLinear


def linear_layers(llm) -> list[torch.nn.Module]:
    """The projections one decode step runs, each once (a tied output head counts once, as the head)."""
    model = llm.model
    return [m for m in model.layers.modules() if isinstance(m, (torch.nn.Linear, CpuLinear))] + [model.lm_head]


def seconds_per_pass(layers: list[torch.nn.Module], call) -> float:
    inputs = [torch.randn(1, layer.in_features) for layer in layers]
    start = time.perf_counter()
    for layer, x in zip(layers, inputs):
        call(layer, x)
    return time.perf_counter() - start


def seconds_per_decode_token(llm, new_tokens: int) -> float:
    """One decode step of our engine at batch 1 (first to last generated token, over `new_tokens` steps)."""
    prompt = [list(range(100, 228))]
    return timed_generation(llm, prompt, new_tokens + 1, torch.device("cpu"))[1] / new_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--weights", default="fp32", help="weight format of our step and kernels (default: fp32)")
    parser.add_argument("--drop-attn", type=parse_layer_list, default=None, metavar="LAYERS")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, interleaved (default: 7)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode tokens per round (default: 32)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = llmdrop_rt.load(args.model, drop_attn=args.drop_attn, device="cpu", weights=None)  # torch modules
    ours = llmdrop_rt.load(args.model, drop_attn=args.drop_attn, device="cpu", weights=args.weights)
    dense_layers, our_layers = linear_layers(dense), linear_layers(ours)
    weight_bytes = sum(layer.weight_bytes() for layer in our_layers)
    dense_bytes = sum(layer.weight.nbytes for layer in dense_layers)
    seconds_per_decode_token(ours, 2)  # warm up
    bandwidth, torch_gemv, our_gemv, step = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so all see the same machine state
        bandwidth.append(read_bandwidth(args.threads))
        torch_gemv.append(min(seconds_per_pass(dense_layers, lambda m, x: F.linear(x, m.weight)) for _ in range(3)))
        our_gemv.append(min(seconds_per_pass(our_layers, lambda m, x: m(x)) for _ in range(3)))
        step.append(seconds_per_decode_token(ours, args.new_tokens))
    bw, torch_s, ours_s, step_s = (statistics.median(v) for v in (bandwidth, torch_gemv, our_gemv, step))
    floor_s = weight_bytes / bw
    result = {
        "model": str(ours.folder), "weights": args.weights, "drop_attn": args.drop_attn or [],
        "threads": args.threads, "torch": torch.__version__, "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bw / 1e9, "floor_ms": floor_s * 1e3, "floor_tok_s": 1 / floor_s,
        "torch_fp32_gemv_pass_ms": torch_s * 1e3, "torch_fp32_gemv_gb_s": dense_bytes / torch_s / 1e9,
        "our_gemv_pass_ms": ours_s * 1e3, "our_gemv_gb_s": weight_bytes / ours_s / 1e9,
        "our_step_ms": step_s * 1e3, "our_tok_s": 1 / step_s, "our_step_of_floor": floor_s / step_s,
        "outside_gemv_share": 1 - ours_s / step_s,
    }
    print(f"{len(our_layers)} projections, {args.weights}: {weight_bytes / 1e6:.0f} MB per token, "
          f"{args.threads} threads")
    print(f"read bandwidth {result['read_bandwidth_gb_s']:.1f} GB/s -> floor {result['floor_ms']:.1f} ms/token "
          f"({result['floor_tok_s']:.1f} tok/s)")
    print(f"torch fp32 GEMV pass {result['torch_fp32_gemv_pass_ms']:.1f} ms "
          f"({result['torch_fp32_gemv_gb_s']:.1f} GB/s)")
    print(f"our GEMV pass        {result['our_gemv_pass_ms']:.1f} ms ({result['our_gemv_gb_s']:.1f} GB/s)")
    print(f"our decode step      {result['our_step_ms']:.1f} ms -> {result['our_tok_s']:.1f} tok/s "
          f"({result['our_step_of_floor']:.0%} of the floor; {result['outside_gemv_share']:.0%} of the step outside "
          "the GEMVs)")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
