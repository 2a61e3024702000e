"""Lazy per-tensor reads from a Hugging Face safetensors checkpoint (single file or sharded).

Only the tensors a caller asks for are read: the loader never asks for a dropped module's weights, so they are
never touched on disk. Only safetensors are read (no pickle).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing files, is corrupt, or lacks/mis-shapes a tensor."""


class CheckpointReader:
    """Maps tensor names to shard files and reads tensors one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: checkpoint folder not found")
        self._handles: dict[str, object] = {}
        self.shard_of = self._tensor_index()
        self.bytes_read = 0  # what get() has loaded so far: lets tests prove dropped weights stay on disk

    def _tensor_index(self) -> dict[str, str]:
        index_path = self.folder / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
            for shard in set(weight_map.values()):
                if not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index_path}: names shard '{shard}', which is missing from {self.folder}")
            return dict(weight_map)
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            others = sorted(p.name for pattern in ("*.bin", "*.pt") for p in self.folder.glob(pattern))
            hint = f" (found {others}: only safetensors are read, never pickle)" if others else ""
            raise CheckpointError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")
        return {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}

    def _open(self, shard: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.folder / shard}: cannot read safetensors file ({e})") from None
        return self._handles[shard]

    def names(self) -> list[str]:
        return list(self.shard_of)

    def has(self, name: str) -> bool:
        return name in self.shard_of

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor as stored; `shape`, when given, is checked and named in the error."""
        if name not in self.shard_of:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        shard = self.shard_of[name]
        try:
            tensor = self._open(shard).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.folder / shard}: cannot read tensor '{name}' ({e})") from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.folder / shard}: tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
            )
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor
