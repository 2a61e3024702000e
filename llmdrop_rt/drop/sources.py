"""Where the scorer's decoder layers come from, and what every scoring pass shares.

Memory: layer streaming. The hidden states of every calibration sample at the current layer live on the CPU; one
decoder layer at a time is read from safetensors (`ModelBuilder.layer(i)`, only its kept weights), run over all
samples and released, so the model's resident memory is about one layer plus activations.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import DropPlan, ModelConfig
from ..io.checkpoint import CheckpointReader
from ..model import ModelBuilder, select_ops, step_context
from ..model.layers import DecoderLayer, Transformer, scale_embeddings
from .calibration import CalibrationSet

Module = tuple[str, int]  # ("attn" | "mlp" | "block", layer index)


class ScoringError(ValueError):
    """A scoring or selection request that cannot be honoured (names the option and the limit)."""


class LayerSource:
    """Hands out the embedding, one decoder layer at a time, and the output head."""

    cfg: ModelConfig
    dtype: torch.dtype
    device: torch.device
    folder: Path | None = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream entering layer 0 (embeddings scaled as the family scales them)."""
        raise NotImplementedError

    def layer(self, index: int, plan: DropPlan) -> DecoderLayer:
        raise NotImplementedError

    def head(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(final norm, output projection); the family's logit soft-capping (`layers.cap_logits`) comes after."""
        raise NotImplementedError

    def inv_freq(self) -> torch.Tensor:
        return self.cfg.rope.inverse_frequencies(self.cfg.head_dim)


class StreamingSource(LayerSource):
    """Reads each piece from the checkpoint when asked and keeps nothing: the caller drops it after use.

    Each piece gets its own short-lived CheckpointReader, so the safetensors memory maps are closed once the piece
    is built: pages of layers already scored do not linger in the process's resident memory.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
        self.folder = Path(folder)
        self.cfg = ModelConfig.from_folder(self.folder)
        CheckpointReader(self.folder)  # fail early on a missing or broken checkpoint
        self.dtype, self.device = dtype, torch.device(device)
        self.ops = select_ops(None, self.device)
        self.base_plan = DropPlan.from_config(self.cfg)
        self.bytes_read = 0  # weights read so far, over all pieces

    def builder(self, plan: DropPlan) -> ModelBuilder:
        return ModelBuilder(self.cfg, plan, CheckpointReader(self.folder), self.dtype, self.device, self.ops)

    def _built(self, plan: DropPlan, build):
        builder = self.builder(plan)
        piece = build(builder)
        self.bytes_read += builder.reader.bytes_read
        return piece

    def embed(self, tokens):
        table = self._built(self.base_plan, ModelBuilder.embedding)
        return scale_embeddings(F.embedding(tokens.to(self.device), table), self.cfg)

    def layer(self, index, plan):
        return self._built(plan, lambda builder: builder.layer(index))

    def head(self):
        return self._built(self.base_plan, ModelBuilder.head)


class InMemorySource(LayerSource):
    """A whole built model (every kept module resident): the reference the streaming source must match."""

    def __init__(self, model: Transformer, folder: str | Path | None = None):
        self.model, self.cfg = model, model.cfg
        self.dtype, self.device = model.dtype, model.device
        self.folder = Path(folder) if folder else None

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> "InMemorySource":
        cfg, device = ModelConfig.from_folder(folder), torch.device(device)
        builder = ModelBuilder(cfg, DropPlan.from_config(cfg), CheckpointReader(folder), dtype, device,
                               select_ops(None, device))
        return cls(builder.build(), folder)

    def embed(self, tokens):
        return scale_embeddings(self.model.embed(tokens.to(self.device)), self.cfg)

    def layer(self, index, plan):
        try:
            return self.model.layers[index].restricted(plan)
        except ValueError as e:
            raise ScoringError(f"in-memory model: {e}") from None

    def head(self):
        return self.model.norm, self.model.lm_head


def batch_slices(n: int, batch_size: int):
    if batch_size < 1:
        raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def progress_bar(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class StepContexts:
    """The step context (rotary tables + mask) of each batch shape, built once."""

    def __init__(self, source: LayerSource, calib: CalibrationSet):
        self.source, self.calib, self.inv_freq, self.cache = source, calib, source.inv_freq(), {}

    def get(self, s: slice):
        valid = self.calib.valid[s]
        padded = not bool(valid.all())
        key = (s.stop - s.start, padded and (s.start, s.stop))
        if key not in self.cache:
            b, t = valid.shape
            device = self.source.device
            positions = torch.arange(t, device=device).expand(b, t)
            self.cache[key] = step_context(self.source.cfg, self.inv_freq.to(device), positions,
                                           key_valid=valid.to(device) if padded else None)
        return self.cache[key]
