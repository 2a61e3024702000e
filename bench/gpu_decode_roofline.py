"""Batch-1 decode of a synthetic model shape against its memory-bandwidth roofline, on any device.

The roofline is (weight bytes per token) / (the device's read bandwidth, one large streaming read measured in the
same run). Weights are SYNTHETIC (random, the real shape): speed does not depend on their values.

    python bench/gpu_decode_roofline.py --shape llama-2-7b --dtype bfloat16 --out bench/results/x.json
"""
from __future__ import annotations

import argparse
import time

import torch

from llmdrop_rt.bench.baselines import attention_layers_to_drop, sync, timed_generation
from llmdrop_rt.bench.synthetic import load_synthetic, model_config
from llmdrop_rt.devices import resolve_device
from llmdrop_rt.io.publish import write_json


def read_bandwidth(device, nbytes: int = 4 << 30) -> float:
    data = torch.randn(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        data.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-7b", help="a llmdrop_rt.bench.synthetic name (default: llama-2-7b)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", help="JSON output")
    args = parser.parse_args()
    device = resolve_device(args.device)
    bandwidth = read_bandwidth(device, (4 << 30) if device.type == "cuda" else (1 << 30))
    rows = []
    for fraction in (0.0, 0.5):
        drop = attention_layers_to_drop(model_config(args.shape).num_layers, fraction)
        llm = load_synthetic(args.shape, drop_attn=drop, dtype=args.dtype, device=device)
        prompt = [[1] * args.prompt_len]
        timed_generation(llm, prompt, 4, device)  # warm-up (graph capture on CUDA)
        _, decode_s = timed_generation(llm, prompt, args.new_tokens, device)
        tok_s = (args.new_tokens - 1) / decode_s
        weight_bytes = llm.param_bytes()
        roofline = bandwidth / weight_bytes
        rows.append({"attn_dropped": len(drop), "decode_tok_s": tok_s, "weight_bytes": weight_bytes,
                     "roofline_tok_s": roofline, "of_roofline": tok_s / roofline})
        print(f"{args.shape} {args.dtype} attn-{len(drop)}: {tok_s:.1f} tok/s, roofline {roofline:.1f} "
              f"({tok_s / roofline:.0%}), {weight_bytes / 1e9:.2f} GB weights")
        del llm
    report = {"shape": args.shape, "synthetic": True, "dtype": args.dtype, "device": str(device),
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "torch": torch.__version__,
              "read_bandwidth_gb_s": bandwidth / 1e9, "rows": rows}
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
