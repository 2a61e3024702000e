"""Where llmdrop-rt keeps what it builds once per user (the converted default model, the llama.cpp peer)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMDROP_RT_CACHE``, else ``$XDG_CACHE_HOME/llmdrop_rt``, else ``~/.cache/llmdrop_rt``."""
    if os.environ.get("LLMDROP_RT_CACHE"):
        return Path(os.environ["LLMDROP_RT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "llmdrop_rt"
    return Path.home() / ".cache" / "llmdrop_rt"
