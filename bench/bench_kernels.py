"""Benchmarks of the Triton kernels in `kernels/` against torch eager, torch.compile and Liger-Kernel.

Shapes are those of SmolLM2-135M, Llama-2-7B and Llama-3-8B, at decode (1 and 8 rows) and prefill
(2048 and 8192 rows), in bf16. Each case reports the median time, the bandwidth it achieves on
the bytes the op must move at least, and that bandwidth as a share of a large ``copy_`` measured
in the same run (the device's practical ceiling). norm_swiglu also reports TFLOP/s.

Two ways to run it (a CUDA device is needed; without one both say why and stop):

    pytest bench/bench_kernels.py                 # pytest-benchmark, one test per case
    python bench/bench_kernels.py --out r.json    # a table on stdout and the results as JSON

It is not part of the default `tests/` run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for `kernels`

from llmdrop_rt.kernels import (  # noqa: E402
    HAVE_TRITON,
    add_rms_norm_,
    add_rms_norm_reference,
    apply_rope_,
    apply_rope_reference,
    norm_swiglu,
    norm_swiglu_reference,
    prepare_norm_mlp,
    rms_norm,
    rms_norm_reference,
)

EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"
MODELS = {
    "smollm2-135m": dict(hidden=576, intermediate=1536, q_heads=9, kv_heads=3, head_dim=64),
    "llama-2-7b": dict(hidden=4096, intermediate=11008, q_heads=32, kv_heads=32, head_dim=128),
    "llama-3-8b": dict(hidden=4096, intermediate=14336, q_heads=32, kv_heads=8, head_dim=128),
}
ROWS = (1, 8, 2048, 8192)
OPS = ("rms_norm", "add_rms_norm_", "norm_swiglu", "rope")
IMPLS = ("triton", "torch", "torch.compile", "liger")


def why_not_runnable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: Triton kernel timings are only meaningful on a GPU"
    if not HAVE_TRITON:
        return "Triton is not installed"
    return None


class Unavailable(Exception):
    """An implementation that cannot run here (e.g. Liger-Kernel not installed)."""


@dataclass
class Workload:
    """One op at one shape: the callable per implementation and the work it must do."""

    make_call: Callable[[str], Callable[[], object]]
    min_bytes: int
    flops: int = 0


def _compiled(fn):
    import torch._dynamo

    # Every shape is a separate specialisation of the same reference function.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(fn, dynamic=False)


def _rows(rows, hidden, generator):
    return torch.randn(rows, hidden, generator=generator, device=DEVICE, dtype=torch.float32).to(DTYPE)


def rms_norm_workload(model, rows, generator) -> Workload:
    hidden = model["hidden"]
    x = _rows(rows, hidden, generator)
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator, device=DEVICE)).to(DTYPE)
    out = torch.empty_like(x)

    def make_call(impl):
        if impl == "triton":
            return lambda: rms_norm(x, weight, EPS, out=out)
        if impl == "torch":
            return lambda: rms_norm_reference(x, weight, EPS)
        if impl == "torch.compile":
            compiled = _compiled(rms_norm_reference)
            return lambda: compiled(x, weight, EPS)
        liger_norm = _liger_rms_norm(weight)
        return lambda: liger_norm(x)

    return Workload(make_call, min_bytes=(2 * rows * hidden + hidden) * x.element_size())


def add_rms_norm_workload(model, rows, generator) -> Workload:
    hidden = model["hidden"]
    residual = _rows(rows, hidden, generator)
    delta = 1e-3 * _rows(rows, hidden, generator)  # small: repeated timing runs keep adding it
    weight = (1 + 0.1 * torch.randn(hidden, generator=generator, device=DEVICE)).to(DTYPE)
    out = torch.empty_like(residual)

    def make_call(impl):
        if impl == "triton":
            return lambda: (residual, add_rms_norm_(residual, delta, weight, EPS, out=out))
        if impl == "torch":
            return lambda: (residual, add_rms_norm_reference(residual, delta, weight, EPS))
        if impl == "torch.compile":
            compiled = _compiled(add_rms_norm_reference)
            return lambda: (residual, compiled(residual, delta, weight, EPS))
        raise Unavailable("Liger-Kernel's fused add + RMSNorm is not wired into this benchmark")

    # Read residual and delta, write residual and the normalised output.
    return Workload(make_call, min_bytes=(4 * rows * hidden + hidden) * residual.element_size())


def norm_swiglu_workload(model, rows, generator) -> Workload:
    hidden, intermediate = model["hidden"], model["intermediate"]
    x = _rows(rows, hidden, generator)
    norm_weight = (1 + 0.1 * torch.randn(hidden, generator=generator, device=DEVICE)).to(DTYPE)
    gate = (torch.randn(intermediate, hidden, generator=generator, device=DEVICE) / hidden ** 0.5).to(DTYPE)
    up = (torch.randn(intermediate, hidden, generator=generator, device=DEVICE) / hidden ** 0.5).to(DTYPE)
    prepared = prepare_norm_mlp(norm_weight, gate, up)
    out = torch.empty(rows, intermediate, device=DEVICE, dtype=DTYPE)

    def make_call(impl):
        if impl == "triton":
            return lambda: norm_swiglu(x, prepared, EPS, out=out)
        if impl == "torch":
            return lambda: norm_swiglu_reference(x, prepared, EPS)
        if impl == "torch.compile":
            compiled = _compiled(norm_swiglu_reference)
            return lambda: compiled(x, prepared, EPS)
        return _liger_norm_swiglu(x, norm_weight, gate, up)

    element = x.element_size()
    return Workload(make_call, min_bytes=(rows * hidden + 2 * intermediate * hidden + rows * intermediate) * element,
                    flops=2 * rows * hidden * 2 * intermediate)


def rope_workload(model, rows, generator) -> Workload:
    q_heads, kv_heads, head_dim = model["q_heads"], model["kv_heads"], model["head_dim"]
    # Decode rows are a batch of single positions; prefill rows one long sequence.
    batch, length = (rows, 1) if rows <= 8 else (1, rows)
    qkv = _rows(batch * length, (q_heads + 2 * kv_heads) * head_dim, generator)
    qkv = qkv.view(batch, length, q_heads + 2 * kv_heads, head_dim)
    q, k = qkv[:, :, :q_heads], qkv[:, :, q_heads:q_heads + kv_heads]
    angles = torch.rand(batch, length, head_dim // 2, generator=generator, device=DEVICE) * 100
    cos, sin = angles.cos(), angles.sin()

    def make_call(impl):
        if impl == "triton":
            return lambda: apply_rope_(q, k, cos, sin)
        if impl == "torch":
            return lambda: apply_rope_reference(q, k, cos, sin)
        if impl == "torch.compile":
            compiled = _compiled(apply_rope_reference)
            return lambda: compiled(q, k, cos, sin)
        return _liger_rope(q, k, cos, sin)

    moved = 2 * batch * length * (q_heads + kv_heads) * head_dim * qkv.element_size()
    tables = 2 * batch * length * (head_dim // 2) * cos.element_size()
    return Workload(make_call, min_bytes=moved + tables)


WORKLOADS = {"rms_norm": rms_norm_workload, "add_rms_norm_": add_rms_norm_workload,
             "norm_swiglu": norm_swiglu_workload, "rope": rope_workload}


def _liger_module(path):
    try:
        import importlib

        return importlib.import_module(path)
    except ImportError as error:
        raise Unavailable(f"Liger-Kernel is not installed ({error})") from error


def _liger_rms_norm(weight):
    module = _liger_module("liger_kernel.transformers.rms_norm")
    norm = module.LigerRMSNorm(weight.shape[0], eps=EPS).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return lambda x: norm(x)


def _liger_norm_swiglu(x, norm_weight, gate, up):
    """Liger has no fused norm + GEMM: its RMSNorm, one packed GEMM and its SiLU-mul."""
    norm = _liger_rms_norm(norm_weight)
    silu_mul = _liger_module("liger_kernel.ops.swiglu").LigerSiLUMulFunction.apply
    gate_up = torch.cat((gate, up))
    intermediate = gate.shape[0]

    def call():
        gate_act, up_act = (norm(x) @ gate_up.t()).split(intermediate, dim=-1)
        return silu_mul(gate_act, up_act)

    return call


def _liger_rope(q, k, cos, sin):
    """Liger wants [B, heads, T, D] and full-width tables; it returns rotated tensors."""
    rotary = _liger_module("liger_kernel.transformers.rope").liger_rotary_pos_emb
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)

    def call():
        rotated_q, rotated_k = rotary(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
        return rotated_q.transpose(1, 2), rotated_k.transpose(1, 2)

    return call


def median_ms(fn) -> float:
    """Median of CUDA-event timings, L2 flushed before each call (Triton's do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


@functools.lru_cache(maxsize=1)
def copy_bandwidth_gbps() -> float:
    """Read + write bandwidth of a 1 GiB device-to-device ``copy_``, the practical ceiling."""
    source = torch.empty(1 << 29, dtype=torch.bfloat16, device=DEVICE).normal_()
    target = torch.empty_like(source)
    milliseconds = median_ms(lambda: target.copy_(source))
    bandwidth = 2 * source.nbytes / milliseconds / 1e6
    return bandwidth


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [tensor for item in result for tensor in _flatten(item)]


def max_relative_error(op, model, rows, impl) -> float:
    """Largest difference from torch eager over the outputs, relative to eager's largest value."""
    outputs = {}
    for name in (impl, "torch"):
        workload = WORKLOADS[op](MODELS[model], rows, torch.Generator(device=DEVICE).manual_seed(0))
        outputs[name] = [tensor.float().clone() for tensor in _flatten(workload.make_call(name)())]
    return max(((ours - eager).abs().max() / eager.abs().max().clamp_min(1e-30)).item()
               for ours, eager in zip(outputs[impl], outputs["torch"]))


def run_case(op, model, rows, impl) -> dict:
    """Time one case; raises Unavailable when the implementation cannot run here."""
    workload = WORKLOADS[op](MODELS[model], rows, torch.Generator(device=DEVICE).manual_seed(0))
    call = workload.make_call(impl)
    try:
        call()  # compile / autotune outside the timing
        torch.cuda.synchronize()
    except Exception as error:
        if impl != "liger":
            raise
        raise Unavailable(f"Liger-Kernel failed on this case: {type(error).__name__}: {error}") from error
    milliseconds = median_ms(call)
    gbps = workload.min_bytes / milliseconds / 1e6
    result = dict(op=op, model=model, rows=rows, impl=impl, median_us=milliseconds * 1e3, gb_per_s=gbps,
                  pct_of_copy=100 * gbps / copy_bandwidth_gbps(), min_bytes=workload.min_bytes)
    if workload.flops:
        result["tflop_per_s"] = workload.flops / milliseconds / 1e9
    if impl != "torch":
        result["max_rel_err_vs_torch"] = max_relative_error(op, model, rows, impl)
    return result


# ----------------------------------------------------------------------------------------------
# pytest-benchmark entry point

if __name__ != "__main__":
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

pytestmark = pytest.mark.skipif(why_not_runnable() is not None, reason=str(why_not_runnable()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("op", OPS)
def test_kernel_speed(benchmark, op, model, rows, impl):
    try:
        result = run_case(op, model, rows, impl)
    except Unavailable as reason:
        pytest.skip(str(reason))
    benchmark.extra_info.update(result, copy_gb_per_s=copy_bandwidth_gbps())
    workload = WORKLOADS[op](MODELS[model], rows, torch.Generator(device=DEVICE).manual_seed(0))
    call = workload.make_call(impl)
    repeats = 20

    def timed_batch():  # synchronise once per batch so short kernels are not timed as launch + sync
        for _ in range(repeats):
            call()
        torch.cuda.synchronize()

    benchmark.pedantic(timed_batch, rounds=10, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------------------------
# script entry point

def _print_table(results: list[dict]) -> None:
    header = f"{'op':<14}{'model':<14}{'rows':>6}  {'impl':<14}{'median us':>11}{'GB/s':>9}{'% copy':>8}" \
             f"{'TFLOP/s':>9}{'rel err':>10}"
    print(header)
    print("-" * len(header))
    for row in results:
        if "skipped" in row:
            print(f"{row['op']:<14}{row['model']:<14}{row['rows']:>6}  {row['impl']:<14}skipped: {row['skipped']}")
            continue
        tflops = f"{row['tflop_per_s']:.1f}" if "tflop_per_s" in row else ""
        error = f"{row['max_rel_err_vs_torch']:.1e}" if "max_rel_err_vs_torch" in row else ""
        print(f"{row['op']:<14}{row['model']:<14}{row['rows']:>6}  {row['impl']:<14}{row['median_us']:>11.1f}"
              f"{row['gb_per_s']:>9.0f}{row['pct_of_copy']:>8.1f}{tflops:>9}{error:>10}")


def _write_json_atomically(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        temporary = handle.name
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    args = parser.parse_args(argv)

    reason = why_not_runnable()
    if reason is not None:
        print(f"bench_kernels: skipped: {reason}")
        if args.out:
            _write_json_atomically(args.out, {"skipped": reason})
        return 0

    results = []
    for op in args.ops:
        for model in args.models:
            for rows in args.rows:
                for impl in args.impls:
                    try:
                        results.append(run_case(op, model, rows, impl))
                    except Unavailable as unavailable:
                        results.append(dict(op=op, model=model, rows=rows, impl=impl, skipped=str(unavailable)))
                    torch.cuda.empty_cache()
    _print_table(results)
    print(f"\ncopy_ bandwidth (read + write): {copy_bandwidth_gbps():.0f} GB/s on {torch.cuda.get_device_name()}")
    if args.out:
        import triton

        _write_json_atomically(args.out, dict(
            device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            dtype=str(DTYPE), copy_gb_per_s=copy_bandwidth_gbps(), results=results))
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
