"""KV-cache table in the layout of LLM-Drop's Table 4, for real model shapes, without any weights.

    python -m llmdrop_rt.bench.kv_table         # the paper's rows: Mistral-7B, Llama-2-13B/70B (+ Llama-3)

Each entry is the runtime's own cache allocation made on the `meta` device (shapes and dtype only, no memory),
so the figures are what `KVCache` would really allocate for that model and drop plan; the closed-form
2 x kept_layers x batch x kv_heads x seq x head_dim x bytes is checked against it. Sizes are GiB (2^30 bytes):
with them Mistral-7B and Llama-2-70B reproduce the paper's printed figures exactly; its Llama-2-13B "52 -> 26"
matches neither GiB (50 -> 25) nor decimal GB (53.7 -> 26.8), though the halving does.
"""
from __future__ import annotations

import argparse

import torch

from ..config import DropPlan
from ..devices import dtype_name, resolve_dtype
from ..model.cache import KVCache
from .baselines import deepest_attention_layers
from .synthetic import model_config

# (model, batch size, attention layers kept after the drop). The first three are LLM-Drop's Table 4 (seq 2048,
# 16-bit); their KV figures are quoted next to ours. The Llama-3 rows drop half the attention layers (our choice).
PAPER_ROWS = [("mistral-7b", 64, 20), ("llama-2-13b", 32, 20), ("llama-2-70b", 32, 40),
              ("llama-3-8b", 32, 16), ("llama-3-70b", 32, 40)]
PAPER_GB = {"mistral-7b": (16, 10), "llama-2-13b": (52, 26), "llama-2-70b": (20, 10)}  # full -> dropped, as printed


def cache_bytes(name: str, batch: int, seq: int, kept: int | None = None, dtype=torch.float16) -> int:
    """Bytes of the runtime's KV cache for `name` at this batch and length with `kept` attention layers."""
    cfg = model_config(name)
    kept = cfg.num_layers if kept is None else kept
    plan = DropPlan.create(cfg.num_layers, deepest_attention_layers(cfg.num_layers, cfg.num_layers - kept))
    allocated = KVCache(cfg, plan, batch, seq, dtype, "meta").nbytes()
    element = torch.empty((), dtype=dtype).element_size()
    closed_form = 2 * kept * batch * cfg.num_kv_heads * seq * cfg.head_dim * element
    if allocated != closed_form or allocated != KVCache.bytes_for(cfg, plan, batch, seq, dtype):
        raise AssertionError(f"{name}: meta allocation {allocated} B != closed form {closed_form} B")
    return allocated


def kv_rows(rows=PAPER_ROWS, seq: int = 2048, dtype=torch.float16) -> list[dict]:
    out = []
    for name, batch, kept in rows:
        cfg = model_config(name)
        full, dropped = cache_bytes(name, batch, seq, None, dtype), cache_bytes(name, batch, seq, kept, dtype)
        out.append({"model": name, "batch": batch, "seq": seq, "dtype": dtype_name(dtype),
                    "layers_full": cfg.num_layers, "layers_kept": kept, "kv_heads": cfg.num_kv_heads,
                    "head_dim": cfg.head_dim, "full_bytes": full, "dropped_bytes": dropped,
                    "paper_gb": PAPER_GB.get(name)})
    return out


def format_kv_table(rows: list[dict]) -> str:
    lines = ["| Model | Batch | Seq | Attention layers | KV cache (GiB) | Saved | LLM-Drop Table 4 (GB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_gb'][0]} → {r['paper_gb'][1]}" if r["paper_gb"] else "-"
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['layers_full']} → {r['layers_kept']} | "
                     f"{r['full_bytes'] / 2**30:.1f} → {r['dropped_bytes'] / 2**30:.1f} | "
                     f"{1 - r['dropped_bytes'] / r['full_bytes']:.1%} | {paper} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m llmdrop_rt.bench.kv_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default: 2048, the paper's)")
    parser.add_argument("--dtype", default="float16", help="cache dtype: float16 | bfloat16 | float32 "
                                                           "(default: float16, the paper's 16-bit)")
    args = parser.parse_args(argv)
    print(format_kv_table(kv_rows(seq=args.seq, dtype=resolve_dtype(args.dtype, torch.device("cpu")))))


if __name__ == "__main__":
    main()
