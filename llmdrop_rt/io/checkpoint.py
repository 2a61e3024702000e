"""Lazy per-tensor reads from a Hugging Face safetensors checkpoint (single file or sharded).

Only the tensors a caller asks for are read: the loader never asks for a dropped module's weights, so they are
never touched on disk. Only safetensors are read (no pickle). The reader remembers which tensors were read, so
`io.accounting` can refuse a checkpoint holding tensors the built model does not account for.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..validation import expect_object

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
        self.used: set[str] = set()  # the names get() has handed out

    def _tensor_index(self) -> dict[str, str]:
        index_path = self.folder / INDEX_FILE
        if index_path.is_file() and (self.folder / SINGLE_FILE).is_file():  # readers disagree on which one wins
            raise CheckpointError(f"{self.folder}: holds both {SINGLE_FILE} and {INDEX_FILE}; expected one of them")
        if index_path.is_file():
            weight_map = _weight_map(index_path)
            for shard in sorted(set(weight_map.values())):
                if not (self.folder / shard).is_file():
                    raise CheckpointError(f"{index_path}: names shard '{shard}', which is missing from {self.folder}")
            return weight_map
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

    def unindexed(self) -> dict[str, str]:
        """Tensors stored in a shard that the index does not list there (name -> shard): never read, so
        `io.accounting` reports them."""
        stored = {}
        for shard in sorted(set(self.shard_of.values())):
            stored.update({name: shard for name in self._open(shard).keys() if self.shard_of.get(name) != shard})
        return stored

    def has(self, name: str) -> bool:
        return name in self.shard_of

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One tensor as stored; `shape`, when given, is checked and named in the error."""
        if name not in self.shard_of:
            shard = self.unindexed().get(name) if (self.folder / INDEX_FILE).is_file() else None
            hint = f" (it is stored in {shard}, but {INDEX_FILE} does not list it there)" if shard else ""
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint{hint}")
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
        self.used.add(name)
        return tensor


def _weight_map(index_path: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map; each shard must be a plain file name in the folder."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
    index = expect_object(index, str(index_path), CheckpointError)
    weight_map = expect_object(index.get("weight_map"), f"{index_path}: weight_map", CheckpointError)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: weight_map['{name}'] = {shard!r}: expected the file name of a "
                                  "shard in the checkpoint folder")
    return dict(weight_map)
