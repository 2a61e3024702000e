"""What each CPU weight format costs in accuracy: perplexity of ours at fp32/fp16/bf16/int8/int4, and llama.cpp's
on the same weights at F32 / Q8_0 / Q4_0, on the same tokens.

Both sides score a text the way llama-perplexity does (chunks of --ctx tokens, the second half of each chunk
scored; bench.llama_cpp.chunked_perplexity on ours), so the figures compare number for number. The GGUF files
come from our exporter (bench.llama_cpp.peer_gguf); llama.cpp's rows need `make peers`.

A whole chunk in one pass runs our prefill arithmetic (many rows per matrix product: dequantized tiles and a GEMM).
`--paths decode` scores the same chunks with the decode arithmetic instead: every CPU linear layer is fed at most
GEMV_MAX_ROWS rows at a time, so it runs the GEMV kernels that decoding runs (they quantise activations per block
of 32: to int8 for the 4-bit formats, as llama.cpp does for Q4_0, and to int16 for int8 weights).

Caveat: the embedded SmolLM2-135M-Instruct ships as Q4_1, so its weights already sit on a 4-bit grid. That
flatters every 4-bit result (int4 here rounds weights that were 4-bit to begin with).

`--kv-cache fp16` scores with keys and values rounded to an fp16 cache on both sides (ours through
`load(kv_cache=...)`, llama-perplexity's -ctk/-ctv); the default keeps both in fp32.

    python bench/bench_weight_accuracy.py [--text tests/data/eval.txt] [--ctx 512] [--out bench/results/F.json]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch

import llmdrop_rt
from llmdrop_rt.bench import llama_cpp
from llmdrop_rt.io.publish import write_json
from llmdrop_rt.model.builder import WEIGHT_FORMATS
from llmdrop_rt.model.cache import KV_CACHE_DTYPES, resolve_kv_dtype
from llmdrop_rt.quant import cpu_linear


@contextlib.contextmanager
def decode_arithmetic():
    """CpuLinear layers fed GEMV_MAX_ROWS rows at a time: each row's result is what the decode kernels give it."""
    forward = cpu_linear.CpuLinear.forward

    def in_gemv_slices(self, x):
        rows = x.reshape(-1, x.shape[-1]).split(cpu_linear.GEMV_MAX_ROWS)
        return torch.cat([forward(self, part) for part in rows]).reshape(*x.shape[:-1], self.out_features)

    cpu_linear.CpuLinear.forward = in_gemv_slices
    try:
        yield
    finally:
        cpu_linear.CpuLinear.forward = forward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--text", default="tests/data/eval.txt", help="text to score (default: tests/data/eval.txt)")
    parser.add_argument("--ctx", type=int, default=512, help="chunk length (default: 512)")
    parser.add_argument("--max-chars", type=int, default=None, help="score only the start of the text")
    parser.add_argument("--paths", default="prefill,decode",
                        help="our arithmetic to score: prefill, decode or both (default: prefill,decode)")
    parser.add_argument("--weights", default=",".join(WEIGHT_FORMATS),
                        help=f"our weight formats to score (default: {','.join(WEIGHT_FORMATS)}); llama.cpp scores "
                             "the ones it has a type for")
    parser.add_argument("--kv-cache", choices=["auto", *KV_CACHE_DTYPES], default="auto",
                        help="KV cache dtype on both sides (default: auto, fp32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    reference = llmdrop_rt.load(args.model)
    folder = reference.folder
    text = Path(args.text).read_text()[: args.max_chars].removesuffix("\n")
    # As llama-perplexity: the text tokenized whole (our tokenizer adds BOS where the model's config asks for it).
    tokens = reference.tokenizer.encode(text)
    rows = []
    paths = [p.strip() for p in args.paths.split(",")]
    if not paths or not set(paths) <= {"prefill", "decode"}:
        parser.error(f"--paths {args.paths!r}: expected prefill, decode or both")
    formats = [w.strip() for w in args.weights.split(",")]
    if not formats or not set(formats) <= set(WEIGHT_FORMATS):
        parser.error(f"--weights {args.weights!r}: expected some of {','.join(WEIGHT_FORMATS)}")
    kv_type = llama_cpp.GGUF_KV_TYPES[resolve_kv_dtype(args.kv_cache, reference.dtype)]
    for path in paths:
        for weights in formats:
            # The folder: float weights, rounded at load as asked.
            llm = llmdrop_rt.load(folder, weights=weights, kv_cache=args.kv_cache)
            with decode_arithmetic() if path == "decode" else contextlib.nullcontext():
                result = llama_cpp.chunked_perplexity(llm, tokens, args.ctx)
            rows.append({"impl": "llmdrop_rt", "path": path, "weights": weights, "perplexity": result.perplexity,
                         "chunks": result.chunks, "weight_bytes": llm.param_bytes()})
            print(f"ours {path} {weights:5s} ppl {result.perplexity:.4f} ({result.chunks} chunks of {args.ctx})",
                  flush=True)
    try:
        llama_cpp.bin_dir()
        with tempfile.TemporaryDirectory() as scratch:
            text_file = Path(scratch) / "text.txt"
            text_file.write_text(text + "\n")
            for weights in (w for w in ("fp32", "int8", "int4") if w in formats):
                gguf_path = llama_cpp.peer_gguf(folder, reference.plan, llama_cpp.PEER_TYPES[weights])
                result = llama_cpp.perplexity(gguf_path, text_file, args.ctx, args.threads, kv_type)
                rows.append({"impl": "llama.cpp", "weights": llama_cpp.PEER_TYPES[weights],
                             "perplexity": result.perplexity, "chunks": result.chunks,
                             "weight_bytes": gguf_path.stat().st_size, "repack": result.repack})
                plain = "" if result.repack else " (with --no-repack: its repacked layouts crashed)"
                print(f"llama.cpp {llama_cpp.PEER_TYPES[weights]:5s} ppl {result.perplexity:.4f}{plain}", flush=True)
    except llama_cpp.LlamaCppNotBuilt as e:
        print(f"llama.cpp rows left out: {e}")
    base = rows[0]  # ours, the first format asked for
    relative = f"vs_{base['weights']}"
    print(f"\n| impl | arithmetic | weights | perplexity | vs ours {base['weights']} | weights MB |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        row[relative] = row["perplexity"] / base["perplexity"] - 1
        print(f"| {row['impl']} | {row.get('path', '')} | {row['weights']} | {row['perplexity']:.4f} | "
              f"{row[relative]:+.2%} | {row['weight_bytes'] / 1e6:.0f} |")
    if args.out:
        write_json(args.out, {"command": "python bench/bench_weight_accuracy.py " + " ".join(sys.argv[1:]),
                              "text": args.text, "ctx": args.ctx, "kv_cache": kv_type,
                              "cpu_kernels": cpu_linear.kernel_isa(), "tokens": len(tokens), "rows": rows})


if __name__ == "__main__":
    main()
