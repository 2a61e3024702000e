"""Named profiler ranges per decoder layer and module kind; shared no-op contexts unless profiling turns them on.

The model carries a `ranges` object per decoder layer and one for the stack. Normally these are shared no-op
contexts (the hot path pays one attribute lookup and a null `with`); `enable_ranges(model)` swaps in ranges that
open a `torch.profiler.record_function` (and, on CUDA, an NVTX range for Nsight Systems) named like
`L12.attention`, `L12.mlp_norm`, `lm_head`. `range_kind` maps a recorded name back to its module kind.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch

KINDS = ("embedding", "norm", "attention", "mlp", "lm_head")
_LAYER_PARTS = {"attn_norm": "norm", "attention": "attention", "mlp_norm": "norm", "mlp": "mlp"}
_STACK_PARTS = {"embedding": "embedding", "final_norm": "norm", "lm_head": "lm_head"}

_NULL = contextlib.nullcontext()
NO_LAYER_RANGES = SimpleNamespace(**{part: _NULL for part in _LAYER_PARTS})
NO_STACK_RANGES = SimpleNamespace(**{part: _NULL for part in _STACK_PARTS})


class NamedRange:
    """A reusable context: record_function(name) for torch.profiler, plus an NVTX range on CUDA."""

    def __init__(self, name: str, nvtx: bool):
        self.name, self.nvtx = name, nvtx
        self._record = None

    def __enter__(self):
        self._record = torch.profiler.record_function(self.name)
        self._record.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._record.__exit__(*exc)
        return False


def range_kind(name: str) -> str | None:
    """The module kind of one of our range names ('L3.mlp_norm' -> 'norm'), None for any other event."""
    head, _, part = name.partition(".")
    if part and head[:1] == "L" and head[1:].isdigit():
        return _LAYER_PARTS.get(part)
    return _STACK_PARTS.get(name)


def enable_ranges(model, nvtx: bool | None = None) -> None:
    """Give every layer of `model` (a Transformer) live named ranges."""
    if nvtx is None:
        nvtx = model.device.type == "cuda"
    for layer in model.layers:
        layer.ranges = SimpleNamespace(**{p: NamedRange(f"L{layer.index}.{p}", nvtx) for p in _LAYER_PARTS})
    model.ranges = SimpleNamespace(**{p: NamedRange(p, nvtx) for p in _STACK_PARTS})


def disable_ranges(model) -> None:
    for layer in model.layers:
        layer.ranges = NO_LAYER_RANGES
    model.ranges = NO_STACK_RANGES


@contextlib.contextmanager
def ranges_enabled(model, nvtx: bool | None = None):
    enable_ranges(model, nvtx)
    try:
        yield
    finally:
        disable_ranges(model)


