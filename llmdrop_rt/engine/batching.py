"""Continuous batching: a request joins the running decode batch at the next step and leaves it when it is done.

One KV pool of `max_batch` rows x `max_len` columns (kept attention layers only) holds every running request. The
running rows stay packed at pool rows 0..n-1 (a leaving row's place is taken by the last one, its K/V copied
over), so a decode step computes exactly the running rows and a freed row is reused by the next request.

All rows share one write column, the clock: a decode step writes every row's new K/V at that column. A row's
tokens fill the contiguous columns that end at the clock, and a per-row mask hides the columns before them: the
left padding the static batch uses, so each row attends over exactly its own keys, at its own rotary positions.
When the clock reaches the pool's end, or the columns before the longest row outnumber the ones in use, the live
columns are moved back to the pool's start.

A joining request is prefilled alone (batch 1, into a scratch cache: its solo prefill, exactly), between two
decode steps; its K/V are then copied into its row, right-aligned at the clock. Its first token comes from that
prefill, the others from the shared decode steps. Every row samples with its own `torch.Generator`, seeded by its
request, so a seeded request draws the same tokens whichever batch it runs in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model.cache import KVCache
from ..model.layers import Transformer
from .generation import ContextLengthError
from .sampling import Sampling, greedy, sample


@dataclass(eq=False)
class BatchRequest:
    """One prompt to continue. `should_stop(tokens)` (optional) ends it with reason "stop", as EOS does.

    `tokens` (generated so far) and `finish_reason` ("stop", "length" once max_new_tokens are out, "cancelled")
    are filled in by the batcher. `cancel()` may be called from any thread; the row leaves before the next step.
    """

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    eos_ids: frozenset[int] = frozenset()
    should_stop: Callable[[list[int]], bool] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False

    def cancel(self):
        self.cancelled = True

    def _record(self, token: int):
        self.tokens.append(token)
        if token in self.eos_ids or (self.should_stop is not None and self.should_stop(self.tokens)):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"


@dataclass(eq=False)
class _Row:
    request: BatchRequest
    generator: torch.Generator
    length: int  # K/V columns it holds: they end at the clock
    last_token: int  # fed at the next step


class ContinuousBatcher:
    """The running batch over one KV pool. Not thread-safe: one thread calls `join` and `step`."""

    def __init__(self, model: Transformer, max_batch: int, max_len: int, attn_backend: str = "sdpa"):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"the KV pool needs max_batch >= 1 and max_len >= 2, got {max_batch} x {max_len}")
        context = model.cfg.max_position_embeddings
        if max_len > context:
            raise ValueError(f"max_len={max_len} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings)")
        self.model, self.attn_backend = model, attn_backend
        self.max_batch, self.max_len = max_batch, max_len
        self.pool = KVCache(model.cfg, model.plan, max_batch, max_len, model.kv_dtype, model.device)
        self.rows: list[_Row] = []
        self.clock = 0  # the pool column the next decode step writes

    @property
    def free_rows(self) -> int:
        return self.max_batch - len(self.rows)

    def check(self, prompt_tokens: int, max_new_tokens: int):
        """Raise unless a request of this size fits the pool (ContextLengthError for a too-long one)."""
        if prompt_tokens < 1:
            raise ValueError("the prompt must contain at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_len:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} = "
                f"{prompt_tokens + max_new_tokens} exceeds the context of {self.max_len} tokens")

    @torch.inference_mode()
    def join(self, request: BatchRequest) -> int:
        """Prefill `request` alone and give it a free row (unless its first token already finished it); returns
        that first token."""
        self.check(len(request.prompt), request.max_new_tokens)
        if not self.free_rows:
            raise RuntimeError("no free row in the batch")
        model, device, length = self.model, self.model.device, len(request.prompt)
        scratch = KVCache(model.cfg, model.plan, 1, length, model.kv_dtype, device)
        tokens = torch.tensor([request.prompt], device=device)
        positions = torch.arange(length, device=device)[None]
        logits = model(tokens, positions, scratch, 0, None, self.attn_backend, last_only=True)[:, -1]
        generator = _generator(request.sampling.seed, device)
        token = int(sample(logits, request.sampling, generator))
        request._record(token)
        if request.finish_reason is None:
            self._make_room(length)
            row = len(self.rows)
            self.pool.k[:, row, :, self.clock - length:self.clock] = scratch.k[:, 0]
            self.pool.v[:, row, :, self.clock - length:self.clock] = scratch.v[:, 0]
            self.rows.append(_Row(request, generator, length, token))
        return token

    @torch.inference_mode()
    def step(self) -> list[tuple[BatchRequest, int]]:
        """Drop the cancelled rows, then one decode step of every running row: (request, its new token) per row.
        The rows that finish leave the batch."""
        for row in self.rows:
            if row.request.cancelled:
                row.request.finish_reason = "cancelled"
        self._leave()
        if not self.rows:
            return []
        self._make_room(0)
        device, clock, rows = self.model.device, self.clock, self.rows
        tokens = torch.tensor([[row.last_token] for row in rows], device=device)
        lengths = torch.tensor([row.length for row in rows], device=device)
        key_valid = None
        if any(row.length != clock for row in rows):
            key_valid = torch.arange(clock + 1, device=device)[None, :] >= (clock - lengths)[:, None]
        logits = self.model(tokens, lengths[:, None], self.pool.first_rows(len(rows)), clock, key_valid,
                            self.attn_backend)[:, -1]
        self.clock += 1
        emitted = []
        for row, token in zip(rows, self._sample(logits)):
            row.length += 1
            row.last_token = token
            row.request._record(token)
            emitted.append((row.request, token))
        self._leave()
        return emitted

    def reset(self):
        """Drop every row (after a failed step, when the pool's contents are unknown)."""
        self.rows.clear()
        self.clock = 0

    def _sample(self, logits: torch.Tensor) -> list[int]:
        if all(row.request.sampling.temperature == 0 for row in self.rows):
            return greedy(logits).tolist()
        return [int(sample(logits[i:i + 1], row.request.sampling, row.generator)) for i, row in enumerate(self.rows)]

    def _leave(self):
        """Remove the finished rows, moving the last row into each freed one so the running rows stay packed."""
        for index in reversed(range(len(self.rows))):
            if self.rows[index].request.finish_reason is None:
                continue
            last = self.rows.pop()
            if index < len(self.rows):
                columns = slice(self.clock - last.length, self.clock)
                self.pool.k[:, index, :, columns] = self.pool.k[:, len(self.rows), :, columns]
                self.pool.v[:, index, :, columns] = self.pool.v[:, len(self.rows), :, columns]
                self.rows[index] = last

    def _make_room(self, prompt_length: int):
        """Move the live columns so that a prompt of `prompt_length` fits before the clock and the clock's column
        exists, and so that unused columns before the longest row never outnumber the used ones."""
        width = max((row.length for row in self.rows), default=0)
        needed = max(width, prompt_length)
        if not (self.clock < needed or self.clock >= self.max_len or self.clock - needed > needed):
            return
        if width:
            n, old, new = len(self.rows), slice(self.clock - width, self.clock), slice(needed - width, needed)
            for cache in (self.pool.k, self.pool.v):
                cache[:, :n, :, new] = cache[:, :n, :, old].clone()
        self.clock = needed


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own random stream: from its seed, else from fresh entropy (never shared between rows)."""
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    return torch.Generator(device=device).manual_seed(seed)
