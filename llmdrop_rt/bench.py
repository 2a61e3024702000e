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

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from . import bench_sweep
from .synthetic import skip_attention

DEFAULT_OUT = Path("bench/out/bench.json")


def attention_layers_to_drop(num_layers: int, fraction: float) -> list[int]:
    """The deepest attention layers, sparing the last one (LLM-Drop finds deep attention the most redundant).
    Speed does not depend on which layers go; `python -m llmdrop_rt score` chooses them by importance."""
    count = round(num_layers * fraction)
    return list(range(num_layers - 1 - count, num_layers - 1)) if count else []


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 1, (batch, length), generator=gen).tolist()


class _Runner:
    """Times prefill and decode for one implementation (ours or transformers)."""

    def __init__(self, job):
        self.job = job
        self.device = torch.device(job["device"])

    def run(self) -> dict:
        job, device = self.job, self.device
        self.load()
        result = {"weight_bytes": self.weight_bytes()}
        prompt = _prompts(self.vocab, 1, job["prompt_len"])
        self.prefill(prompt)  # warm-up
        times = []
        for _ in range(job["repeats"]):
            bench_sweep.sync(device)
            t0 = time.perf_counter()
            self.prefill(prompt)
            bench_sweep.sync(device)
            times.append(time.perf_counter() - t0)
        result["prefill_tok_s"] = job["prompt_len"] / min(times)
        for batch in job["batch_sizes"]:
            prompts = _prompts(self.vocab, batch, job["prompt_len"])
            self.decode_time(prompts, 4)  # warm-up
            best = min(self.decode_time(prompts, job["new_tokens"]) for _ in range(job["repeats"]))
            result[f"decode_tok_s_b{batch}"] = batch * (job["new_tokens"] - 1) / best
            result[f"kv_bytes_b{batch}"] = self.kv_bytes(batch, job["prompt_len"] + job["new_tokens"])
        result["peak_memory_bytes"] = _peak_memory(device)
        return result


class _Ours(_Runner):
    def load(self):
        import llmdrop_rt

        self.llm = llmdrop_rt.load(self.job["model"], drop_attn=self.job["drop_attn"], drop_mlp=[],
                                   dtype=self.job["dtype"], device=self.device, kernels=self.job["kernels"],
                                   decode=self.job["decode"])
        self.vocab = self.llm.cfg.vocab_size

    def weight_bytes(self):
        return self.llm.param_bytes()

    def kv_bytes(self, batch, length):
        return self.llm.kv_cache_bytes(batch, length)

    def prefill(self, prompt):
        with torch.inference_mode():
            tokens = torch.tensor(prompt, device=self.device)
            positions = torch.arange(tokens.shape[1], device=self.device)[None]
            from llmdrop_rt.cache import KVCache

            model = self.llm.model
            cache = KVCache(model.cfg, model.plan, 1, tokens.shape[1], model.embed.weight.dtype, self.device)
            model(tokens, positions, cache, 0, None, self.llm.engine.attn_backend, last_only=True)

    def decode_time(self, prompts, new_tokens):
        return bench_sweep.timed_generation(self.llm, prompts, new_tokens, self.device)[1]


class _Transformers(_Runner):
    """transformers' generate on the same weights, dtype and threads; with drops, the modules are skipped in the
    forward but still allocated and cached (LLM-Drop's own approach)."""

    def load(self):
        from transformers import AutoModelForCausalLM

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.job["dtype"]]
        self.model = AutoModelForCausalLM.from_pretrained(self.job["model"], dtype=dtype).to(self.device).eval()
        self.vocab = self.model.config.vocab_size
        for i in self.job["drop_attn"]:
            skip_attention(self.model.model.layers[i])

    def weight_bytes(self):
        return sum(p.nbytes for p in self.model.parameters())

    def kv_bytes(self, batch, length):
        """What transformers' cache holds at the end of generation: the layers whose attention runs."""
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        element = next(self.model.parameters()).element_size()
        layers = cfg.num_hidden_layers - len(self.job["drop_attn"])
        return 2 * layers * batch * cfg.num_key_value_heads * (length - 1) * head_dim * element

    def prefill(self, prompt):
        with torch.inference_mode():
            self.model(torch.tensor(prompt, device=self.device), use_cache=True, logits_to_keep=1)

    def decode_time(self, prompts, new_tokens):
        _, stamps, _ = bench_sweep.timed_transformers_generate(self.model, prompts, new_tokens, self.device)
        return stamps[-1] - stamps[1]


def worker(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    runner = _Ours(job) if job["impl"] == "llmdrop_rt" else _Transformers(job)
    return runner.run()


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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m llmdrop_rt.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                      "bfloat16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--drop", default="0,0.25,0.5",
                        help="fractions of attention layers to drop, comma-separated (default: 0,0.25,0.5)")
    parser.add_argument("--batch-sizes", default="1,8", help="decode batch sizes (default: 1,8)")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per row (default: 32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats inside each run of a configuration; the best is kept (default: 3)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every configuration, round-robin; the table shows medians (default: 3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for every configuration (default: torch's default here)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline rows")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    bench_sweep.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if bench_sweep.wanted(args):  # --sweep / --profile / --kv-table: see llmdrop_rt/bench_sweep.py
        bench_sweep.run(args, argv)
        return

    from .config import ModelConfig

    if args.model is None:
        from .gguf_import import default_model_path

        args.model = str(default_model_path())
    cfg = ModelConfig.from_folder(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    common = dict(model=args.model, dtype=dtype, device=device, threads=args.threads, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, repeats=args.repeats, rounds=args.rounds, batch_sizes=batch_sizes)
    jobs = []
    for fraction in [float(f) for f in args.drop.split(",")]:
        drop = attention_layers_to_drop(cfg.num_layers, fraction)
        jobs.append(dict(common, impl="llmdrop_rt", drop_attn=drop, label=f"llmdrop_rt attn-{len(drop)}",
                         kernels="auto", decode="auto"))
    if device == "cuda":  # what the fused kernels and CUDA graphs buy, on the full model
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
            results[job["label"]].append(bench_sweep.run_in_subprocess(job, module="llmdrop_rt.bench"))
    rows = [dict(label=job["label"], impl=job["impl"], drop_attn=job["drop_attn"],
                 attn_kept=cfg.num_layers - len(job["drop_attn"]), num_layers=cfg.num_layers,
                 **median_of_rounds(results[job["label"]])) for job in jobs]
    table = format_table(rows, batch_sizes)
    print(table)
    report = {"command": "python -m llmdrop_rt.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(device, args.threads), "settings": common, "rows": rows, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
