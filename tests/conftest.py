"""Shared test setup.

Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The switch is
read when a kernel is decorated, so it must be set before anything imports `kernels`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
