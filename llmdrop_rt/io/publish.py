"""Writing outputs so that a reader never sees half of one, a failure never loses what was there before, and
nothing we did not write is ever replaced.

Files are written under a temporary sibling name and renamed into place (a rename within one folder is atomic).
Outputs that are models -- checkpoint folders (`staged_output`) and GGUF files (`staged_file`) -- are built in a
staging sibling and published by a rename that refuses a destination which appeared meanwhile, so of two runs
writing the same new destination exactly one succeeds and the other fails naming it. A destination that exists is
replaced only when asked (`overwrite`, the CLI's --force) and only when it is one of our own outputs: a folder
carrying OUTPUT_MARKER, or for a file what the caller's `ours` recognises (a GGUF file by its magic).

Staging names carry the writer's pid; a staging sibling whose process is gone (a killed run) is removed by the next
run writing the same destination, so nothing is left behind for long and staging is never taken for an output.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

# Written into every checkpoint folder we publish as an output: what --force may replace.
OUTPUT_MARKER = "llmdrop_rt_output.json"
STAGING_TAGS = ("tmp", "partial", "old")


class OutputError(ValueError):
    """An output that cannot be written where asked without destroying something."""


def sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name next to `path` (same filesystem, so a rename between them is atomic) carrying our
    pid, ending in the same suffix (tools such as matplotlib pick the format from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex}.{tag}{path.suffix}")


def _staging_pattern(path: Path) -> re.Pattern:
    tags = "|".join(STAGING_TAGS)
    return re.compile(rf"\.{re.escape(path.stem)}\.(\d+)-[0-9a-f]{{32}}\.(?:{tags}){re.escape(path.suffix)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def reclaim_stale_staging(path: Path) -> list[Path]:
    """Remove the staging siblings of `path` left by runs that no longer exist (killed mid-write)."""
    pattern = _staging_pattern(path)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it but symlinks) the permissions a new file or folder gets
    under the user's umask: libraries we write through (safetensors, mkstemp users) create theirs 0600."""
    mask = current_umask()
    for entry in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` for the block to write; renamed onto `path` when the block succeeds, removed
    when it fails. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale_staging(path)
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


def is_our_output(folder: Path) -> bool:
    """Whether `folder` is a checkpoint folder this package published as an output."""
    return folder.is_dir() and not folder.is_symlink() and (folder / OUTPUT_MARKER).is_file()


def check_output_folder(destination: Path, overwrite: bool) -> None:
    """Refuse, before any work, a destination that exists unless `overwrite` and it is one of our outputs."""
    if not (destination.exists() or destination.is_symlink()):
        return
    if destination.is_dir() and not destination.is_symlink() and not any(destination.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise OutputError(f"{destination} already exists (pass overwrite=True / --force to replace an output of "
                          "ours)")
    if not is_our_output(destination):
        raise OutputError(f"refusing to replace {destination}: it is not a folder written by llmdrop-rt (no "
                          f"{OUTPUT_MARKER}); remove it yourself or choose another destination")


@contextlib.contextmanager
def staged_folder(destination: str | Path) -> Iterator[Path]:
    """A fresh staging folder next to `destination`, removed again if the block raises.

    `mkdir` (unlike mkdtemp) honours the umask, so the published folder gets the user's usual permissions.
    Stale staging siblings of the same destination (runs that were killed) are removed first.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale_staging(destination)
    staging = sibling(destination, "partial")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_output(destination: str | Path, overwrite: bool = False, written_by: dict | None = None) -> Iterator[Path]:
    """A staging folder for a new checkpoint folder at `destination`; when the block succeeds it is marked as our
    output and published, replacing an existing destination only with `overwrite` and only if it is ours."""
    destination = Path(destination)
    check_output_folder(destination, overwrite)
    with staged_folder(destination) as staging:
        yield staging
        write_json(staging / OUTPUT_MARKER, {"written_by": "llmdrop-rt", **(written_by or {})})
        publish_folder(staging, destination, replace=is_our_output if overwrite else None)


def publish_folder(staging: Path, destination: Path, keep_existing: Callable[[Path], bool] | None = None,
                   replace: Callable[[Path], bool] | None = None) -> None:
    """Rename the finished `staging` folder to `destination`.

    A destination that is absent or an empty folder is taken. Where it holds something, `keep_existing(dest)`
    decides when given (True keeps it and discards staging, False replaces it, raising refuses); else it is
    replaced only if `replace(dest)` says so, and otherwise the publication fails without touching it.
    """
    follow_umask(staging)
    try:
        os.rename(staging, destination)  # succeeds if destination is absent or an empty folder
        return
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise OutputError(f"{destination} exists and is not a folder; refusing to replace it") from None
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if keep_existing is not None:
        if keep_existing(destination):
            shutil.rmtree(staging)
            return
    elif replace is None or not replace(destination):
        raise OutputError(f"{destination} appeared while this run was writing it (another run writing the same "
                          "destination?); it was left as it is and this result discarded")
    old = sibling(destination, "old")
    os.rename(destination, old)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(old, destination)  # put the previous folder back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_output_file(destination: Path, overwrite: bool, ours: Callable[[Path], bool]) -> None:
    """Refuse, before any work, a destination that is a folder, or exists unless `overwrite` and `ours` says it
    is a file of the kind being written."""
    if destination.is_dir():
        raise OutputError(f"{destination} is a folder; give a file name")
    if destination.exists() or destination.is_symlink():
        if not overwrite:
            raise OutputError(f"{destination} already exists (pass overwrite=True / --force to replace it)")
        if not ours(destination):
            raise OutputError(f"refusing to replace {destination}: it is not a file of the kind this writes")


@contextlib.contextmanager
def staged_file(destination: str | Path, overwrite: bool = False,
                ours: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """A staging sibling for a new file at `destination`, published when the block succeeds.

    An existing destination is refused unless `overwrite` and `ours(destination)`; without `overwrite` the name is
    claimed by a hard link, which fails rather than replaces if a file appeared there while we were writing.
    """
    destination = Path(destination)
    check_output_file(destination, overwrite, ours)
    destination.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale_staging(destination)
    staging = sibling(destination, "partial")
    try:
        yield staging
        follow_umask(staging)
        if overwrite:
            if (destination.exists() or destination.is_symlink()) and not ours(destination):
                raise OutputError(f"refusing to replace {destination}: it is not a file of the kind this writes")
            os.replace(staging, destination)
        else:
            try:
                os.link(staging, destination)
            except FileExistsError:
                raise OutputError(f"{destination} appeared while this run was writing it (another run writing "
                                  "the same destination?); it was left as it is") from None
            staging.unlink()
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
