"""Writing outputs so that a reader never sees half of one, and a failure never loses what was there before.

Files are written under a temporary sibling name and renamed into place (a rename within one folder is atomic).
Folders are built in a staging sibling (`staged_folder`) and published by rename; a folder being replaced is moved
aside first and put back if the final rename fails.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator


def sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name next to `path` (same filesystem, so a rename between them is atomic), ending in the
    same suffix (tools such as matplotlib pick the format from it)."""
    return path.with_name(f".{path.stem}.{uuid.uuid4().hex}.{tag}{path.suffix}")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` for the block to write; renamed onto `path` when the block succeeds, removed
    when it fails. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    """`data` as indented JSON, written atomically; values JSON cannot express are written as their str()."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def staged_folder(destination: str | Path) -> Iterator[Path]:
    """A fresh staging folder next to `destination`, removed again if the block raises.

    `mkdir` (unlike mkdtemp) honours the umask, so the published folder gets the user's usual permissions.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = sibling(destination, "partial")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_folder(staging: Path, destination: Path, keep_existing: Callable[[Path], bool] | None = None) -> None:
    """Rename the finished `staging` folder to `destination`.

    Where `destination` already holds something, `keep_existing(destination)` decides: True keeps it (staging is
    discarded), False replaces it, and it may raise to refuse. Without it an existing folder is replaced.
    """
    try:
        os.rename(staging, destination)  # succeeds if destination is absent or an empty folder
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if keep_existing is not None and keep_existing(destination):
        shutil.rmtree(staging)
        return
    old = sibling(destination, "old")
    os.rename(destination, old)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(old, destination)  # put the previous folder back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)
