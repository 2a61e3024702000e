"""One fault case: a command line and the outcome it must have."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]  # the arguments after `python -m llmdrop_rt`
    expect: str  # "error": one clear line naming `mentions`; "ok": a correct result
    mentions: tuple[str, ...] = ()  # what the error line must name (a field, file, tensor or argument)
    check: Callable[[str], bool] | None = field(default=None, compare=False)  # "ok": is this stdout correct
