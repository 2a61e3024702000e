"""Scoring bench: the `cosine` metric for every granularity (attention, MLP, block) on SmolLM2-135M, 64 x 512
calibration tokens, through our layer-streaming pass and through transformers with forward hooks, in one run.
Also the peak resident memory of streaming vs all-in-memory scoring, each in a fresh subprocess.

    python bench/bench_scoring.py [--n-samples 64] [--seq-len 512] [--out results.json]

Target (issue 3): under 2 minutes on a 2-core CPU, and no slower than transformers + hooks.
Calibration text: tests/data/calib.txt followed by tests/data/eval.txt (one file alone has too few tokens for
64 x 512; the bench only measures time and memory).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmdrop_rt.drop.calibration import build_calibration, read_texts  # noqa: E402
from llmdrop_rt.drop.metrics import score_pass  # noqa: E402
from llmdrop_rt.drop.sources import InMemorySource, StreamingSource  # noqa: E402
from llmdrop_rt.io.tokenizer import Tokenizer  # noqa: E402


def calibration(folder, n_samples, seq_len):
    texts = read_texts(ROOT / "tests/data/calib.txt") + read_texts(ROOT / "tests/data/eval.txt")
    return build_calibration(Tokenizer(folder), texts, n_samples, seq_len, seed=0)


@torch.inference_mode()
def transformers_with_hooks(folder, calib, batch_size):
    """The same three cosine importances through transformers' modules and forward hooks."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - started
    layers = model.model.layers
    sums = {kind: [0.0] * len(layers) for kind in ("attn", "mlp", "block")}
    seen = {}

    def cos_sum(a, b):
        return float(F.cosine_similarity(a.float(), b.float(), dim=-1).double().sum())

    def on_attn(i):
        def hook(module, args, kwargs, output):
            seen[i] = output[0]
        return hook

    def on_layer(i):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            mid = x + seen.pop(i)
            sums["attn"][i] += cos_sum(x, mid)
            sums["mlp"][i] += cos_sum(mid, y)
            sums["block"][i] += cos_sum(x, y)
        return hook

    for i, layer in enumerate(layers):
        layer.self_attn.register_forward_hook(on_attn(i), with_kwargs=True)
        layer.register_forward_hook(on_layer(i), with_kwargs=True)
    started = time.perf_counter()
    for s in range(0, calib.n_samples, batch_size):
        model.model(calib.tokens[s: s + batch_size])  # the base model: no lm_head, as our pass
    seconds = time.perf_counter() - started
    total = calib.tokens.numel()
    return {k: [1 - v / total for v in values] for k, values in sums.items()}, seconds, load_seconds


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: after fork + exec that still counts the
    parent's pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_rss_child(mode: str, folder: str, n_samples: int, seq_len: int, batch_size: int):
    """Run in a fresh process: print the peak RSS before and after one scoring pass."""
    calib = calibration(folder, n_samples, seq_len)
    before = peak_rss_mib()
    source = StreamingSource(folder) if mode == "streaming" else InMemorySource.from_folder(folder)
    table = score_pass(source, calib, batch_size=batch_size, progress=False)
    after = peak_rss_mib()
    print(json.dumps({"mode": mode, "peak_rss_mib_before": before, "peak_rss_mib": after,
                      "seconds": table.seconds, "cosine": table.importance["cosine"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=64, help="calibration sequences (default: 64)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default: 8)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the two peak-memory subprocesses")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--rss-child", choices=["streaming", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    args = parser.parse_args()
    if args.rss_child:
        return peak_rss_child(args.rss_child, args.model, args.n_samples, args.seq_len, args.batch_size)

    from llmdrop_rt.io.gguf_import import default_model_path

    folder = args.model or default_model_path()
    calib = calibration(folder, args.n_samples, args.seq_len)
    print(f"SmolLM2-135M, {calib.n_samples} x {calib.seq_len} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    ours = score_pass(StreamingSource(folder), calib, batch_size=args.batch_size, progress=False)
    print(f"ours (layer streaming, cosine+bi+angular, all granularities): {ours.seconds:.1f} s")
    reference, hf_seconds, hf_load = transformers_with_hooks(folder, calib, args.batch_size)
    print(f"transformers + hooks (cosine, all granularities): {hf_seconds:.1f} s (+ {hf_load:.1f} s loading)")
    diff = max(abs(a - b) for kind in reference for a, b in zip(ours.importance["cosine"][kind], reference[kind]))
    print(f"max |ours - transformers| over all cosine scores: {diff:.2e}")
    results = {"n_samples": calib.n_samples, "seq_len": calib.seq_len, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "ours_seconds": ours.seconds,
               "transformers_seconds": hf_seconds, "transformers_load_seconds": hf_load,
               "max_abs_diff_vs_transformers": diff}
    if not args.skip_memory:
        children = {}
        for mode in ("streaming", "in-memory"):
            run = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--model", str(folder),
                                  "--n-samples", str(args.n_samples),
                                  "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)],
                                 capture_output=True, text=True, check=True)
            children[mode] = json.loads(run.stdout.strip().splitlines()[-1])
            child = children[mode]
            print(f"{mode:10s}: peak RSS {child['peak_rss_mib']:.0f} MiB (process before scoring: "
                  f"{child['peak_rss_mib_before']:.0f} MiB), pass {child['seconds']:.1f} s")
        same = children["streaming"]["cosine"] == children["in-memory"]["cosine"]
        print(f"streaming and in-memory cosine scores identical: {same}")
        results["memory"] = {m: {k: v for k, v in c.items() if k != "cosine"} for m, c in children.items()}
        results["streaming_equals_in_memory"] = same
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
