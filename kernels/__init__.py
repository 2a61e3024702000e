"""Fused Triton kernels for the runtime's hot ops, each with a plain-torch reference (`llmdrop_rt.kernels`).

The Triton functions need a CUDA device (or Triton's CPU interpreter, for tests); the
``*_reference`` functions are the runtime's path everywhere else and need only torch.
``HAVE_TRITON`` says whether Triton could be imported.

Python also finds this folder as a top-level package named ``kernels`` whenever the checkout's root is on sys.path
(``python -m ...`` run from it, pytest there). Whoever imports that name wants PyPI's ``kernels`` (transformers
does, since 5.25), so under that name this file loads the installed package in its place, or stays empty.
"""
import sys


def _stand_aside_for_the_installed_kernels() -> None:
    """Replace this module in sys.modules by the `kernels` package found on sys.path without the checkout's root."""
    import importlib.machinery
    import importlib.util
    import os

    checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None:
        return  # none installed: an empty package, which transformers reads as "kernels is not available"
    installed = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = installed  # what the import statement hands out once this file has run
    spec.loader.exec_module(installed)


if __name__ == "kernels":
    _stand_aside_for_the_installed_kernels()
else:
    from ._triton import HAVE_TRITON
    from .int4_gemm import int4_gemm, int4_gemm_reference
    from .norm_mlp import DECODE_MAX_ROWS, NormMLPWeights, norm_swiglu, norm_swiglu_reference, prepare_norm_mlp
    from .rms_norm import add_rms_norm_, add_rms_norm_reference, rms_norm, rms_norm_reference
    from .rope import apply_rope_, apply_rope_reference

    __all__ = [
        "HAVE_TRITON",
        "DECODE_MAX_ROWS",
        "NormMLPWeights",
        "add_rms_norm_",
        "add_rms_norm_reference",
        "apply_rope_",
        "apply_rope_reference",
        "int4_gemm",
        "int4_gemm_reference",
        "norm_swiglu",
        "norm_swiglu_reference",
        "prepare_norm_mlp",
        "rms_norm",
        "rms_norm_reference",
    ]
