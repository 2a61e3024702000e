"""`python -m llmdrop_rt.bench`: the quick bench by default; sweeps, profiling and the KV table behind flags."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..devices import dtype_name, resolve_device, resolve_dtype
from ..model.cache import KV_CACHE_DTYPES
from . import quick, sweeps

DEFAULT_OUT = Path("bench/out/bench.json")
DEFAULT_PLOT = Path("bench/out/bench.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmdrop_rt.bench", description=quick.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                      "bfloat16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--weights", default=",".join(quick.CPU_WEIGHTS),
                        help="CPU weight formats of our rows, comma-separated (default: all of "
                             f"{','.join(quick.CPU_WEIGHTS)}; see load(weights=))")
    parser.add_argument("--kv-cache", choices=["auto", *KV_CACHE_DTYPES], default="auto",
                        help="KV cache dtype of our rows (see load(kv_cache=)); llama.cpp's rows cache K/V in the "
                             "same type (-ctk/-ctv), f16 for an fp32 cache, which llama-bench lacks (default: auto, "
                             "the activations' dtype: fp32 on CPU)")
    parser.add_argument("--drop", default="0,0.5",
                        help="fractions of attention layers to drop, comma-separated (default: 0,0.5)")
    parser.add_argument("--batch-sizes", default="1", help="decode batch sizes, e.g. 1,8 (default: 1)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row (default: 32)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed repeats inside each run of a configuration; the best is kept (default: 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="runs of every configuration, round-robin; the tables show medians (default: 1)")
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="torch threads, comma-separated thread counts to compare, e.g. 1,2 (default: torch's "
                             "default here)")
    parser.add_argument("--peers", choices=["auto", "llama.cpp", "none"], default="auto",
                        help="llama.cpp rows on the same weights: auto = when `make peers` has built it, llama.cpp = "
                             "required, none = left out (default: auto; CPU only)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline rows")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--plot", type=lambda text: Path(text) if text else None, default=DEFAULT_PLOT,
                        help=f"PNG of decode speed by precision (default: {DEFAULT_PLOT}; needs matplotlib; an empty "
                             "path: none)")
    sweeps.add_arguments(parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads {args.threads!r}: expected thread counts such as 2 or 1,2")
    args.threads = args.thread_counts[0]  # what the sweeps and the profile use
    device = resolve_device(args.device)
    args.device, args.dtype = str(device), dtype_name(resolve_dtype(args.dtype, device))
    args.model_name = None
    if args.kv_table:
        from .kv_table import format_kv_table, kv_rows

        print(format_kv_table(kv_rows()))
    if not (args.model or args.synthetic):
        from ..io.gguf_import import default_model_path

        args.model = str(default_model_path())
        args.model_name = "SmolLM2-135M-Instruct (embedded)"
    if args.profile:
        sweeps.run_profile(args)
    if args.sweep:
        sweeps.run_sweeps(args, argv)
    if not (args.kv_table or args.profile or args.sweep):
        quick.run(args, argv)
