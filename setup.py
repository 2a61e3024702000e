"""Build script: the package itself is pure Python; csrc/ holds the optional C++/CUDA extensions.

When torch is importable at build time (`pip install --no-build-isolation -e .`), torch's cpp_extension builds
`llmdrop_rt._int4_cpu` (csrc/int4_cpu.cpp: AWQ/GPTQ int4), `llmdrop_rt._cpu_gemv` (csrc/cpu_gemv.cpp: ops over
the CPU weight formats' GEMV kernels of csrc/cpu_gemv.h), `llmdrop_rt._cpu_decode` (csrc/cpu_decode.cpp: the decode
step of all decoder layers and the output head in one call, compiling its own copy of those kernels) and, only
where torch has CUDA and nvcc is found, `llmdrop_rt._int4_cuda` (csrc/int4_cuda.cu). Without torch, or if a compile
fails, the package still installs and runs on the pure-torch paths (each Python wrapper detects which compiled
modules import); set LLMDROP_RT_REQUIRE_EXT=1 to make a failed compile fail the build.
"""
import os
import sys

from setuptools import setup


def extension_build_kwargs():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("llmdrop-rt: torch not importable at build time; skipping the C++ extensions", file=sys.stderr)
        return {}

    # at::parallel_for is a header template inlined into each extension: against an OpenMP build of torch it runs
    # threads only when the extension is compiled with OpenMP too (its libgomp resolves to the copy torch loaded,
    # so torch.set_num_threads applies). Baseline ISA only: the AVX2 kernels are compiled per function with target
    # attributes and picked at run time.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []

    def cpu_extension(name: str, source: str):
        return cpp_extension.CppExtension(name, [source], depends=["csrc/x86_simd.h", "csrc/cpu_gemv.h"],
                                          extra_compile_args=["-O3", *openmp], extra_link_args=openmp)

    extensions = [
        cpu_extension("llmdrop_rt._int4_cpu", "csrc/int4_cpu.cpp"),
        cpu_extension("llmdrop_rt._cpu_gemv", "csrc/cpu_gemv.cpp"),
        cpu_extension("llmdrop_rt._cpu_decode", "csrc/cpu_decode.cpp"),
    ]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        extensions.append(
            cpp_extension.CUDAExtension(
                "llmdrop_rt._int4_cuda",
                ["csrc/int4_cuda.cu"],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
            )
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """A failed compile leaves the pure-torch fallback instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler failure means "no extension"
                if os.environ.get("LLMDROP_RT_REQUIRE_EXT"):
                    raise
                print(f"llmdrop-rt: building {ext.name} failed ({e}); using the pure-torch fallback",
                      file=sys.stderr)

    return {"ext_modules": extensions, "cmdclass": {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}}


setup(**extension_build_kwargs())
