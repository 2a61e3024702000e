"""A static-shape decode step, replayed as a CUDA graph so batch-1 decode is not bound by kernel launches.

Every tensor the step touches keeps its shape and address from one token to the next: the token, position and
cache-index inputs are copied into fixed buffers, K/V are written with `index_copy_` at a tensor index, and
attention reads the whole preallocated cache under a mask computed on the device from that index. On CPU (or with
graphs off) the same step runs eagerly, which is how the tests check it against the ordinary path.
"""
from __future__ import annotations

import torch

from ..model.cache import KVCache
from ..model.layers import StepContext, Transformer


class StaticDecoder:
    def __init__(self, model: Transformer, cache: KVCache, key_valid: torch.Tensor | None, attn_backend: str,
                 use_graph: bool, warmup_start: int):
        device = model.device
        batch, self.model, self.cache, self.attn_backend = cache.batch_size, model, cache, attn_backend
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        if key_valid is None:
            key_valid = torch.ones(batch, cache.max_len, dtype=torch.bool, device=device)
        self.key_valid = key_valid[:, None, None, :]  # [B, 1, 1, S]
        self.key_index = torch.arange(cache.max_len, device=device)
        self.graph = None
        if use_graph:
            self._capture(warmup_start)

    def _step(self):
        cfg = self.model.cfg
        visible = self.key_valid & (self.key_index <= self.start)
        sliding = None
        if cfg.sliding_window is not None:
            sliding = visible & (self.key_index > self.start - cfg.sliding_window)
        if cfg.sliding_layers is None:  # one window (or none) for every layer
            ctx = StepContext(self.model.rope_tables(self.positions), self.cache, self.start,
                              visible if sliding is None else sliding, self.attn_backend)
        else:
            ctx = StepContext(self.model.rope_tables(self.positions), self.cache, self.start, visible,
                              self.attn_backend, sliding)
        return self.model.run(self.tokens, ctx)

    def _capture(self, warmup_start: int):
        # Warm-up runs (Triton autotuning, cuBLAS handles) happen outside the capture, on a side stream. They write
        # K/V at `warmup_start`, the slot the first real step overwrites anyway.
        self.start.fill_(warmup_start)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.start.fill_(start)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
