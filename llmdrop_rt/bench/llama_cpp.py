"""llama.cpp as a peer runtime: locate the binaries `make peers` built, and run them on GGUF files.

    from llmdrop_rt.bench import llama_cpp
    llama_cpp.run_llama_bench("model.gguf", threads=(1, 2))     # llama-bench's JSON records
    llama_cpp.perplexity("model.gguf", "text.txt", ctx=128)      # llama-perplexity's estimate
    llama_cpp.greedy("model.gguf", "The capital of France is", 16)

The binaries are found in ``$LLMDROP_RT_LLAMA_CPP`` (a folder holding them, or one with a ``bin/`` that does),
else in the cache folder bench/build_llama_cpp.sh installs into:
``${LLMDROP_RT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/llmdrop_rt}/llama.cpp/<version>/bin``.

`chunked_perplexity` computes our own perplexity the way llama-perplexity does (its windows and its scored
tokens differ from llmdrop_rt.perplexity's), so the two can be compared number for number.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.user_cache import cache_dir

__all__ = [
    "LlamaCppNotBuilt",
    "PeerPerplexity",
    "bench_summary",
    "binary",
    "bin_dir",
    "build_info",
    "chunked_perplexity",
    "greedy",
    "perplexity",
    "run_llama_bench",
]

ENV_VAR = "LLMDROP_RT_LLAMA_CPP"
# The llama-cpp-python release whose vendored llama.cpp bench/build_llama_cpp.sh builds (keep the two equal).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
STAMP_FILE = "BUILT"
DEFAULT_TIMEOUT_S = 1800


class LlamaCppNotBuilt(FileNotFoundError):
    """The llama.cpp binaries are not where we look for them."""


@dataclass(frozen=True)
class PeerPerplexity:
    perplexity: float
    mean_nll: float  # natural log, per scored token
    chunks: int
    ctx: int
    repack: bool = True  # llama.cpp ran its repacked layouts (see run_with_plain_layouts_fallback)


# ----------------------------------------------------------------------------------------------------------
# Locating the binaries
# ----------------------------------------------------------------------------------------------------------


def bin_dir() -> Path:
    """The folder holding the llama.cpp binaries; raises LlamaCppNotBuilt (naming `make peers`) when absent."""
    if os.environ.get(ENV_VAR):
        folder = Path(os.environ[ENV_VAR])
        for candidate in (folder, folder / "bin"):
            if (candidate / "llama-bench").is_file():
                return candidate
        raise LlamaCppNotBuilt(f"${ENV_VAR}={folder} holds no llama-bench (nor does its bin/)")
    prefix = _cache_prefix()
    if not (prefix / STAMP_FILE).is_file():
        raise LlamaCppNotBuilt(f"llama.cpp is not built (no {prefix / STAMP_FILE}): run `make peers` to build it")
    return prefix / "bin"


def binary(name: str) -> Path:
    """The path of one llama.cpp tool (llama-bench, llama-completion, llama-perplexity, ...)."""
    path = bin_dir() / name
    if not path.is_file():
        raise LlamaCppNotBuilt(f"{path} is missing: rebuild llama.cpp with `make peers`")
    return path


def build_info() -> dict:
    """What was built: llama-cpp-python and llama.cpp versions (from the build's stamp, or from the binary)."""
    stamp = _cache_prefix() / STAMP_FILE
    if not os.environ.get(ENV_VAR) and stamp.is_file():
        return dict(line.split("=", 1) for line in stamp.read_text().split())
    version = _run([binary("llama-bench"), "--version"]).strip().splitlines()
    return {"llama.cpp": version[0] if version else "unknown"}


def _cache_prefix() -> Path:
    return cache_dir() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def _run(command: list, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """A tool's stdout; a failure raises with the last line it wrote to stderr."""
    command = [str(part) for part in command]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{Path(command[0]).name} exited with {done.returncode}: {last}")
    return done.stdout


def run_with_plain_layouts_fallback(command: list, plain_layouts: list, timeout: float) -> tuple[str, bool]:
    """A tool's stdout, and whether it ran llama.cpp's repacked tensor layouts. Those are CPU-specific code (AMX on
    recent Xeons) that can crash where its plain layouts run: a failed run is repeated with `plain_layouts` (the
    tool's option that turns repacking off)."""
    try:
        return _run(command, timeout), True
    except RuntimeError as failure:
        try:
            return _run(command + plain_layouts, timeout), False
        except RuntimeError as second:
            raise RuntimeError(f"{failure}; with {' '.join(plain_layouts)}: {second}") from None


# ----------------------------------------------------------------------------------------------------------
# The tools
# ----------------------------------------------------------------------------------------------------------


def run_llama_bench(gguf_path: str | os.PathLike, threads=(1,), n_prompt: int = 128, n_gen: int = 32,
                    repetitions: int = 5, kv_type: str = "f16", timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
    """llama-bench's JSON records (one per test and thread count): prompt processing of `n_prompt` tokens
    (n_gen 0) and generation of `n_gen` tokens (n_prompt 0), with avg_ts / stddev_ts in tokens per second; the KV
    cache in `kv_type` (llama.cpp's default f16).

    A run that crashes in llama.cpp's repacked layouts is repeated with `--repack 0`
    (run_with_plain_layouts_fallback), and its records say `"repack": false`."""
    threads = [threads] if isinstance(threads, int) else list(threads)
    command = [binary("llama-bench"), "-m", gguf_path, "-t", ",".join(map(str, threads)), "-p", n_prompt,
               "-n", n_gen, "-r", repetitions, "-ctk", kv_type, "-ctv", kv_type, "-o", "json"]
    return json.loads(run_with_plain_layouts_fallback(command, ["--repack", "0"], timeout)[0])


def bench_summary(records: list[dict]) -> list[dict]:
    """The numbers that matter of llama-bench records: test (pp128/tg32), threads, tok/s and its stddev, and
    whether llama.cpp ran its repacked layouts (see run_llama_bench)."""
    rows = []
    for record in records:
        test = f"pp{record['n_prompt']}" if record["n_gen"] == 0 else f"tg{record['n_gen']}"
        rows.append({"model": record["model_filename"], "type": record["model_type"], "test": test,
                     "threads": record["n_threads"], "tok_s": record["avg_ts"], "stddev": record["stddev_ts"],
                     "repack": record.get("repack", True)})
    return rows


def perplexity(gguf_path: str | os.PathLike, text_file: str | os.PathLike, ctx: int, threads: int | None = None,
               kv_type: str = "f32", timeout: float = DEFAULT_TIMEOUT_S) -> PeerPerplexity:
    """llama-perplexity over `text_file` in chunks of `ctx` tokens.

    llama-perplexity drops one trailing newline of the file, tokenizes it whole, cuts it into len // ctx
    chunks (the last partial one is not used; it needs at least 2 chunks), puts BOS first in each chunk when the
    vocabulary adds BOS, and scores the second half of each chunk. The KV cache is kept in `kv_type` (F32 by
    default, so an F32 model runs in F32 throughout). A run that crashes in llama.cpp's repacked layouts is
    repeated with `--no-repack` (the result's `repack` says which ran).
    """
    command = [binary("llama-perplexity"), "-m", gguf_path, "-f", text_file, "-c", ctx, "-b", ctx,
               "-ctk", kv_type, "-ctv", kv_type, "--ppl-output-type", 1]
    if threads:
        command += ["-t", threads]
    output, repack = run_with_plain_layouts_fallback(command, ["--no-repack"], timeout)
    # --ppl-output-type 1 prints one line per chunk: first token index, running PPL, mean NLL, its stderr.
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", output, flags=re.MULTILINE)
    if not rows:
        raise RuntimeError(f"llama-perplexity printed no per-chunk results for {gguf_path}")
    mean_nll = float(rows[-1][2])
    return PeerPerplexity(math.exp(mean_nll), mean_nll, len(rows), ctx, repack)


def greedy(gguf_path: str | os.PathLike, prompt: str, n: int, threads: int | None = None, kv_type: str = "f32",
           timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The greedy continuation (up to `n` tokens, fewer at an end-of-generation token) of `prompt`, by
    llama-completion: plain completion, no chat template, no escape processing, KV cache in `kv_type`."""
    command = [binary("llama-completion"), "-m", gguf_path, "-p", prompt, "-n", n, "--temp", 0, "-no-cnv",
               "--no-display-prompt", "--no-escape", "--no-warmup", "-ctk", kv_type, "-ctv", kv_type]
    if threads:
        command += ["-t", threads]
    text = _run(command, timeout)
    # llama-completion ends its output with a blank line, after " [end of text]" when it stopped early.
    if not text.endswith("\n\n"):
        raise RuntimeError(f"llama-completion's output does not end as expected: {text[-80:]!r}")
    return text[:-2].removesuffix(" [end of text]\n")


# ----------------------------------------------------------------------------------------------------------
# Our side of the comparison
# ----------------------------------------------------------------------------------------------------------


def chunked_perplexity(llm, tokens: list[int], ctx: int, bos_token_id: int | None = None) -> PeerPerplexity:
    """Our runtime's perplexity computed as llama-perplexity computes it (see `perplexity`).

    llm: an llmdrop_rt LLM; tokens: the text's ids as our tokenizer gives them; bos_token_id: put first in each
    chunk, as llama-perplexity does when the vocabulary adds BOS (None: leave the chunks as they are).
    """
    import torch
    import torch.nn.functional as F

    chunks = len(tokens) // ctx
    if chunks < 2:
        raise ValueError(f"{len(tokens)} tokens make fewer than 2 chunks of {ctx} (llama-perplexity needs 2)")
    first = ctx // 2
    nll_sum, scored = 0.0, 0
    for chunk in range(chunks):
        ids = list(tokens[chunk * ctx: (chunk + 1) * ctx])
        if bos_token_id is not None:
            ids[0] = bos_token_id
        logits = llm.logits(ids)[0].double()
        # The logits at positions first .. ctx-2 predict the tokens at first+1 .. ctx-1.
        targets = torch.as_tensor(ids[first + 1:], device=logits.device)
        nll_sum += float(F.cross_entropy(logits[first: ctx - 1], targets, reduction="sum"))
        scored += ctx - 1 - first
    mean_nll = nll_sum / scored
    return PeerPerplexity(math.exp(mean_nll), mean_nll, chunks, ctx)


# ----------------------------------------------------------------------------------------------------------
# llama.cpp rows of `python -m llmdrop_rt.bench`
# ----------------------------------------------------------------------------------------------------------

# Our weight format -> the GGUF type holding the same weights (our exporter rounds them as our loader does).
PEER_TYPES = {"fp32": "f32", "fp16": "f16", "int8": "q8_0", "int4": "q4_0"}
# Our KV cache dtype -> llama.cpp's cache type of the same precision (-ctk / -ctv).
GGUF_KV_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# The float cache types llama-bench takes: it has no f32 cache, so an fp32 cache of ours meets its default, f16.
LLAMA_BENCH_KV_TYPES = ("f16", "bf16")


def peer_gguf(folder: str | os.PathLike, plan, gguf_type: str) -> Path:
    """The checkpoint at `folder` with `plan` applied, exported once as a GGUF of `gguf_type` and cached
    (keyed by the checkpoint's fingerprint, the plan and the type)."""
    from ..drop.metrics import model_fingerprint
    from ..io.gguf_export import export_gguf

    key = f"{model_fingerprint(folder)[:16]}-a{'_'.join(map(str, sorted(plan.drop_attn)))}" \
          f"-m{'_'.join(map(str, sorted(plan.drop_mlp)))}-{gguf_type}"
    path = cache_dir() / "gguf" / f"{Path(folder).name}-{key}.gguf"
    if not path.is_file():
        export_gguf(folder, path, plan, gguf_type)
    return path


def plan_peer_jobs(args, cfg) -> list[dict]:
    """llama-bench runs matching the bench's rows of ours, when llama.cpp is built and asked for (`--peers`)."""
    from ..config import DropPlan
    from ..devices import resolve_dtype
    from ..model.cache import resolve_kv_dtype
    from .baselines import attention_layers_to_drop

    if args.peers == "none":
        return []
    try:
        bin_dir()
    except LlamaCppNotBuilt as e:
        if args.peers == "llama.cpp":
            raise
        print(f"llama.cpp rows left out: {e}", file=sys.stderr)
        return []
    kv_type = GGUF_KV_TYPES[resolve_kv_dtype(args.kv_cache, resolve_dtype(args.dtype, torch.device("cpu")))]
    if kv_type not in LLAMA_BENCH_KV_TYPES:
        kv_type = "f16"
    jobs = []
    for threads in args.thread_counts:
        for weights in (w.strip() for w in args.weights.split(",")):
            if weights not in PEER_TYPES:
                continue
            for fraction in (float(f) for f in args.drop.split(",")):
                drop = attention_layers_to_drop(cfg.num_layers, fraction)
                jobs.append({"impl": "llama.cpp", "precision": weights, "threads": threads, "drop_attn": drop,
                             "model": args.model, "gguf_type": PEER_TYPES[weights], "num_layers": cfg.num_layers,
                             "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                             "repeats": args.repeats, "batch_sizes": [int(b) for b in args.batch_sizes.split(",")],
                             "kv_type": kv_type,
                             "label": f"llama.cpp {PEER_TYPES[weights]} attn-{len(drop)} t{threads}",
                             "plan": DropPlan.create(cfg.num_layers, drop)})
    return jobs


def measure(job: dict) -> dict:
    """One llama-bench run of a peer job, in the bench's row format (decode at batch 1 only: llama-bench's tg).
    A row that ran with `--repack 0` (see run_llama_bench) says so in `peer_note`."""
    gguf_path = peer_gguf(job["model"], job["plan"], job["gguf_type"])
    records = bench_summary(run_llama_bench(gguf_path, job["threads"], job["prompt_len"], job["new_tokens"],
                                            max(2, job["repeats"]), job["kv_type"]))
    speed = {row["test"][:2]: row["tok_s"] for row in records}
    row = {"prefill_tok_s": speed["pp"], "weight_bytes": gguf_path.stat().st_size}
    if not all(record["repack"] for record in records):
        row["peer_note"] = "ran with --repack 0 (with llama.cpp's default repacked layouts llama-bench failed)"
    for batch in job["batch_sizes"]:
        if batch == 1:
            row["decode_tok_s_b1"] = speed["tg"]
    return row


def describe(jobs: list[dict]) -> dict | None:
    """What ran as the peer (versions and the GGUF types), for the bench's JSON."""
    if not jobs:
        return None
    return {"build": build_info(), "binaries": str(bin_dir()), "types": sorted({j["gguf_type"] for j in jobs})}
