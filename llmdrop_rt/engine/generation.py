"""Generation: batched prefill into a static KV cache, then incremental decode, greedy or sampled.

Prompts of different lengths are left-padded to a common length; each row keeps its own rotary positions and the
padding is masked out of attention, so every row decodes exactly as it would alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..arguments import max_new_tokens as checked_max_new_tokens
from ..arguments import token_ids
from ..model.cache import KVCache
from ..model.layers import Transformer
from .sampling import Sampling, sample
from .static_decode import StaticDecoder


class ContextLengthError(ValueError):
    """A prompt (plus the tokens asked for) that does not fit the model's context or the cache."""


@dataclass
class Step:
    """One decode step: the new token of each row (None once a row has finished before this step)."""

    tokens: list[int | None]
    finished: list[bool]


DECODE_MODES = ("auto", "dynamic", "static", "graph")


class Engine:
    """decode: "dynamic" (attend over the filled cache prefix; fastest eagerly), "static" (fixed shapes, see
    llmdrop_rt.graphs), "graph" (static + CUDA graph replay), "auto" (graph on CUDA, dynamic elsewhere)."""

    def __init__(self, model: Transformer, attn_backend: str = "sdpa", pad_token_id: int = 0, decode: str = "auto"):
        if decode not in DECODE_MODES:
            raise ValueError(f"decode mode {decode!r} is not one of {DECODE_MODES}")
        if decode == "graph" and model.device.type != "cuda":
            raise ValueError("decode='graph' needs a CUDA device")
        self.model = model
        self.attn_backend = attn_backend
        self.pad_token_id = pad_token_id
        self.decode = decode

    @property
    def device(self):
        return self.model.device

    def context_limit(self) -> int:
        return self.model.cfg.max_position_embeddings

    @torch.inference_mode()
    def stream(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        eos_ids: set[int] | frozenset[int] = frozenset(),
        should_stop: Callable[[int, list[int]], bool] | None = None,
    ) -> Iterator[Step]:
        """Yield one Step per generated position until every row hit EOS / should_stop or max_new_tokens."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must contain at least one token")
        vocab_size = self.model.cfg.vocab_size
        prompts = [token_ids(p, vocab_size, f"prompt {row}'s token ids") for row, p in enumerate(prompts)]
        max_new_tokens = checked_max_new_tokens(max_new_tokens)
        longest = max(len(p) for p in prompts)
        total = longest + max_new_tokens
        if total > self.context_limit():
            raise ContextLengthError(
                f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} = {total} exceeds the model's "
                f"context of {self.context_limit()} tokens (max_position_embeddings)"
            )
        model, device, batch = self.model, self.device, len(prompts)
        cache = KVCache(model.cfg, model.plan, batch, total, model.kv_dtype, device)
        pads = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.tensor([[self.pad_token_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
        key_valid = None
        if pads.any():
            key_valid = torch.arange(total, device=device)[None, :] >= pads[:, None]
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=device).manual_seed(sampling.seed)

        positions = (torch.arange(longest, device=device)[None, :] - pads[:, None]).clamp(min=0)
        logits = model(tokens, positions, cache, 0, key_valid, self.attn_backend, last_only=True)
        outputs: list[list[int]] = [[] for _ in prompts]
        finished = [False] * batch
        start = longest
        decode = self.decode
        if decode == "auto":
            decode = "graph" if device.type == "cuda" else "dynamic"
        static = None
        if decode != "dynamic" and max_new_tokens > 1:
            static = StaticDecoder(model, cache, key_valid, self.attn_backend, decode == "graph", start)
        for step in range(max_new_tokens):
            next_tokens = sample(logits[:, -1], sampling, generator)
            ids = next_tokens.tolist()
            new: list[int | None] = []
            for row, token in enumerate(ids):
                if finished[row]:
                    new.append(None)
                    continue
                outputs[row].append(token)
                new.append(token)
                if token in eos_ids or (should_stop is not None and should_stop(row, outputs[row])):
                    finished[row] = True
            yield Step(new, list(finished))
            if all(finished) or step == max_new_tokens - 1:
                return
            positions = (start - pads)[:, None]
            if static is not None:
                logits = static(next_tokens[:, None], positions, start)
            else:
                logits = model(next_tokens[:, None], positions, cache, start, key_valid, self.attn_backend)
            start += 1

    def generate(self, prompts, max_new_tokens, sampling=Sampling(), eos_ids=frozenset(), should_stop=None):
        """Generated token ids per prompt (EOS included when hit)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, sampling, eos_ids, should_stop):
            for row, token in enumerate(step.tokens):
                if token is not None:
                    outputs[row].append(token)
        return outputs
