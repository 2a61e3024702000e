"""Where a model runs and in what precision: the one place that turns user strings into torch devices and dtypes."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device=None) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device asked for where there is none is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    if device.type not in ("cpu", "cuda", "meta"):  # meta: shapes only (parameter counts, cache sizes)
        raise ValueError(f"device {str(device)!r}: llmdrop-rt runs on cpu or cuda")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None: fp32 on CPU, bf16 on GPUs. Strings are the names in DTYPES."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
