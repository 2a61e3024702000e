"""A bounds check of a GGUF file's header, metadata and tensor table before any reader allocates from them.

The `gguf` library's reader trusts the counts and lengths it finds: an absurd tensor count, key count or array
length makes it loop (and allocate) far past the end of the file. `check_header` walks the same layout with
every count and length checked against the bytes that remain, without building anything, and refuses the first
impossible value in one line naming it (the metadata key or tensor, its value and what the file could hold).
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
STRING, ARRAY = 8, 9
# GGUF value type -> bytes of one scalar (uint8, int8, uint16, int16, uint32, int32, float32, bool, -, -,
# uint64, int64, float64)
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
HEADER_BYTES = 24  # magic, version, tensor count, key count
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one byte of value (an empty key is refused below)
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset


class GGUFHeaderError(ValueError):
    """A GGUF header, metadata entry or tensor entry whose count, length or type cannot be right."""


def check_header(path: Path) -> None:
    """Raise GGUFHeaderError for the first count, length or type in `path` that the file cannot hold."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise GGUFHeaderError(f"{path}: {size} bytes, too short for a GGUF header ({HEADER_BYTES} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _Walker(path, data).walk()


class _Walker:
    def __init__(self, path: Path, data):
        self.path, self.data, self.offset = path, data, 0
        self.last_entry = None  # the last entry read whole: a wrong count or length before a failure is often its

    def fail(self, what: str):
        after = f" (after {self.last_entry})" if self.last_entry else ""
        raise GGUFHeaderError(f"{self.path}: {what}{after}")

    def read(self, fmt: str, what: str):
        need = struct.calcsize(fmt)
        if self.offset + need > len(self.data):
            self.fail(f"{what}: the file ends at byte {len(self.data)}, before its {need} bytes at {self.offset}")
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += need
        return values if len(values) > 1 else values[0]

    def left(self) -> int:
        return len(self.data) - self.offset

    def string(self, what: str) -> str:
        length = self.read("<Q", f"{what} length")
        if length > self.left():
            self.fail(f"{what}: a string of {length} bytes, but only {self.left()} bytes follow")
        raw = bytes(self.data[self.offset:self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what}: not UTF-8 text")

    def walk(self) -> None:
        magic, version, tensors, keys = self.read("<4sIQQ", "header")
        if magic != MAGIC:
            self.fail(f"not a readable GGUF file (it starts with {magic!r}, expected {MAGIC!r})")
        if version not in VERSIONS:
            self.fail(f"GGUF version {version} is not supported (expected one of {list(VERSIONS)})")
        if keys > self.left() // MIN_KV_BYTES:
            self.fail(f"GGUF.kv_count = {keys}: more metadata entries than the file could hold "
                      f"(at most {self.left() // MIN_KV_BYTES})")
        if tensors > self.left() // MIN_TENSOR_INFO_BYTES:
            self.fail(f"GGUF.tensor_count = {tensors}: more tensors than the file could hold "
                      f"(at most {self.left() // MIN_TENSOR_INFO_BYTES})")
        for index in range(keys):
            key = self.string(f"metadata entry {index}'s key")
            if not key:
                self.fail(f"metadata entry {index} has an empty key")
            self.value(self.read("<I", f"metadata key {key!r}'s type"), f"metadata key {key!r}", nested=False)
            self.last_entry = f"metadata key {key!r}, entry {index + 1} of GGUF.kv_count = {keys}"
        for index in range(tensors):
            name = self.string(f"tensor entry {index}'s name")
            dims = self.read("<I", f"tensor {name!r}'s dimension count")
            if not 1 <= dims <= MAX_DIMS:
                self.fail(f"tensor {name!r} has {dims} dimensions (expected 1..{MAX_DIMS})")
            shape = [self.read("<Q", f"tensor {name!r}'s shape") for _ in range(dims)]
            if 0 in shape or math.prod(shape) > len(self.data) * 8:  # no GGML type stores under 1 bit an element
                self.fail(f"tensor {name!r} has shape {shape}: more elements than the file could hold")
            self.read("<IQ", f"tensor {name!r}'s type and offset")
            self.last_entry = f"tensor {name!r}, entry {index + 1} of GGUF.tensor_count = {tensors}"

    def value(self, kind: int, what: str, nested: bool) -> None:
        if kind == STRING:
            self.string(what)
        elif kind in SCALAR_BYTES:
            self.read(f"<{SCALAR_BYTES[kind]}s", what)
        elif kind == ARRAY and not nested:
            item_kind, count = self.read("<IQ", f"{what}'s array header")
            if item_kind not in SCALAR_BYTES and item_kind != STRING:
                self.fail(f"{what}: array items of GGUF type {item_kind} (expected a scalar or string type)")
            item_bytes = SCALAR_BYTES.get(item_kind, 8)  # a string is at least its 8-byte length
            if count > self.left() // item_bytes:
                self.fail(f"{what}: an array of {count} items, but only {self.left()} bytes follow")
            if item_kind == STRING:
                for item in range(count):
                    self.string(f"{what}[{item}]")
            else:
                self.offset += count * item_bytes
        else:
            self.fail(f"{what}: GGUF value type {kind} is not one this reader knows"
                      + (" (arrays of arrays are not supported)" if kind == ARRAY else ""))
