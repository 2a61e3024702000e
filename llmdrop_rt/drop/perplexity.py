"""Perplexity in the runtime: the WikiText-2 convention (texts joined with "\\n\\n", windows of seq_len tokens,
PPL = exp(sum of NLL / tokens scored)).

With stride = seq_len (default) the windows do not overlap and each token is predicted from the tokens before it
in its own window (a window's first token has no context and is not scored). With a smaller stride each window
scores only the tokens the previous window did not reach, with up to seq_len - stride tokens of extra context.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.layers import Transformer
from .calibration import read_texts

DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens_scored: int
    windows: int
    seq_len: int
    stride: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_eval_tokens(tokenizer, source: str | Path, split: str = "test", text_field: str = "text",
                     dataset_config: str | None = None, max_tokens: int | None = None) -> list[int]:
    """Token ids of a text file or dataset; a dataset's (or .jsonl/.parquet file's) texts joined with "\\n\\n"."""
    texts = read_texts(source, split, text_field, dataset_config)
    ids = tokenizer.encode("\n\n".join(texts))
    return ids[:max_tokens] if max_tokens else ids


def windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for each window over `total` tokens."""
    spans, previous_end = [], 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        first_scored = max(previous_end - begin, 1)  # position 0 has no context to be predicted from
        if end - begin > first_scored:
            spans.append((begin, end, first_scored))
        previous_end = end
        if end == total:
            break
    return spans


@torch.inference_mode()
def evaluate_perplexity(model: Transformer, tokens, seq_len: int | None = None, stride: int | None = None,
                        batch_size: int = 1, progress: bool = True, attn_backend: str = "sdpa") -> PerplexityResult:
    """Perplexity of `model` on a token sequence (see the module doc for the windowing)."""
    started = time.perf_counter()
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    limit = model.cfg.max_position_embeddings
    seq_len = seq_len or min(DEFAULT_SEQ_LEN, limit)
    stride = stride or seq_len
    if not 2 <= seq_len <= limit:
        raise ValueError(f"seq_len must be in 2..{limit} (the model's context), got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len={seq_len}, got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ids.numel() < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    spans = windows(ids.numel(), seq_len, stride)
    # Windows of the same shape run together; a shorter last window runs alone.
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault((span[1] - span[0], span[2]), []).append(span)
    batches = [group[i: i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    device = model.device
    nll_sum, scored = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), desc="perplexity windows", leave=False)
    for batch in batches:
        length, first = batch[0][1] - batch[0][0], batch[0][2]
        inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
        positions = torch.arange(length, device=device).expand_as(inputs)
        logits = model(inputs, positions, attn_backend=attn_backend).float()
        predicted = logits[:, first - 1: length - 1].flatten(0, 1)
        targets = inputs[:, first:].flatten()
        nll_sum += float(F.cross_entropy(predicted, targets, reduction="sum").double())
        scored += targets.numel()
        if bar:
            bar.update(len(batch))
    if bar:
        bar.close()
    return PerplexityResult(math.exp(nll_sum / scored), nll_sum, scored, len(spans), seq_len, stride,
                            time.perf_counter() - started)
