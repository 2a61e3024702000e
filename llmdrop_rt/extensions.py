"""The optional compiled extensions (csrc/, built by setup.py): importing one registers its torch ops."""
from __future__ import annotations

import importlib

import torch


def compiled_ops(module: str, namespace: str):
    """torch.ops.<namespace> once llmdrop_rt.<module> has registered it, or None when it was not built."""
    try:
        importlib.import_module(f"llmdrop_rt.{module}")
    except ImportError:
        return None
    return getattr(torch.ops, namespace)
