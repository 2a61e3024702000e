"""Profiling: torch.profiler traces of prefill and decode with a named range per layer and module kind.

    report = llmdrop_rt.bench.profile.profile(llm, prompt_len=128, new_tokens=16, out_dir="bench/out/profile")
    print(report.format())
    python -m llmdrop_rt.bench --profile            # the same from the command line

Profiling turns on the model's named ranges (llmdrop_rt.model.ranges: `L12.attention`, `L12.mlp_norm`,
`lm_head`, ...). From the recorded trace the report sums time by module kind
(embedding, norm, attention, mlp, lm_head, other) for each phase, lists the top operators (CPU) or kernels
(CUDA) by self time, and splits memory into weights, KV cache and the rest.

On CPU the times are operator-level CPU times; on CUDA they are device (kernel) times. A decode step replayed as
a CUDA graph, or run as one C++ call from the token ids to the logits (model/cpu_decode.py), hides its ranges, so
`profile()` generates with the engine's eager dynamic path through the modules.
"""
from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..devices import dtype_name
from ..io.publish import write_json
from ..model.ranges import KINDS, range_kind, ranges_enabled


@dataclass
class PhaseProfile:
    """One phase (prefill or decode): wall time, time per module kind, top operators/kernels, trace path."""

    name: str
    tokens: int
    wall_s: float
    time_unit: str  # "cpu" (operator CPU time) or "device" (CUDA kernel time)
    by_kind_s: dict[str, float]
    top_ops: list[dict]
    trace: str


@dataclass
class ProfileReport:
    device: str
    dtype: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    attn_layers_kept: int
    num_layers: int
    phases: list[PhaseProfile] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)  # a timeline: one entry per phase boundary

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"profile: {self.device}, {self.dtype}, batch {self.batch_size}, prompt {self.prompt_len}, "
                 f"{self.new_tokens} new tokens, attention kept in {self.attn_layers_kept}/{self.num_layers} layers"]
        for phase in self.phases:
            total = sum(phase.by_kind_s.values())
            lines += ["", f"{phase.name}: {phase.tokens} tokens in {phase.wall_s * 1e3:.1f} ms wall "
                          f"({phase.time_unit} time by module kind; trace {phase.trace})",
                      "| kind | ms | share |", "|---|---|---|"]
            for kind, seconds in phase.by_kind_s.items():
                lines.append(f"| {kind} | {seconds * 1e3:.2f} | {seconds / total:.1%} |" if total else
                             f"| {kind} | {seconds * 1e3:.2f} | - |")
            lines += ["", f"top {len(phase.top_ops)} {'kernels' if phase.time_unit == 'device' else 'operators'} "
                          "by self time:", "| name | calls | self ms | share |", "|---|---|---|---|"]
            for op in phase.top_ops:
                lines.append(f"| {op['name'][:70]} | {op['calls']} | {op['self_s'] * 1e3:.2f} | {op['share']:.1%} |")
        lines += ["", "memory (MiB): | point | weights | KV cache | other | total |", "|---|---|---|---|---|"]
        for point in self.memory:
            cells = [point["weight_bytes"], point["kv_bytes"], point.get("other_bytes"), point.get("total_bytes")]
            lines.append(f"| {point['point']} | " + " | ".join(_mib(v) for v in cells) + " |")
        return "\n".join(lines)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _memory_point(llm, point: str, kv_bytes: int) -> dict:
    """Weights and KV cache are exact byte counts; `other` is the device allocator's remainder on CUDA (on CPU
    the process's peak RSS is given as total instead, which includes the Python/torch runtime)."""
    entry = {"point": point, "weight_bytes": llm.param_bytes(), "kv_bytes": kv_bytes}
    if llm.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(llm.device)
        entry.update(total_bytes=allocated, other_bytes=allocated - entry["weight_bytes"] - kv_bytes,
                     peak_bytes=torch.cuda.max_memory_allocated(llm.device))
    else:
        entry.update(total_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, other_bytes=None)
    return entry


def _summarise(prof, name: str, tokens: int, wall_s: float, device_time: bool, trace: Path,
               top: int) -> PhaseProfile:
    averages = prof.key_averages()
    total_attr = "device_time_total" if device_time else "cpu_time_total"
    self_attr = "self_device_time_total" if device_time else "self_cpu_time_total"
    by_kind = {kind: 0.0 for kind in KINDS}
    ops = []
    for event in averages:
        kind = range_kind(event.key)
        if kind is not None:
            by_kind[kind] += getattr(event, total_attr) / 1e6  # profiler times are in microseconds
        elif event.key not in ("prefill", "decode") and getattr(event, self_attr) > 0:
            ops.append({"name": event.key, "calls": event.count, "self_s": getattr(event, self_attr) / 1e6})
    # Wall time not inside any of our ranges: sampling, cache writes outside the layers, Python overhead (CPU),
    # or on CUDA kernels outside ranges (device time is compared with the phase's wall time).
    by_kind["other"] = max(wall_s - sum(by_kind.values()), 0.0)
    ops.sort(key=lambda op: -op["self_s"])
    op_total = sum(op["self_s"] for op in ops) or 1.0
    top_ops = [dict(op, share=op["self_s"] / op_total) for op in ops[:top]]
    return PhaseProfile(name, tokens, wall_s, "device" if device_time else "cpu", by_kind, top_ops, str(trace))


def profile(llm, prompt_len: int = 128, new_tokens: int = 16, batch_size: int = 1,
            out_dir: str | Path = "bench/out/profile", top: int = 12, seed: int = 0) -> ProfileReport:
    """Profile one batched generation (random prompt ids of `prompt_len`) after a warm-up: prefill and decode
    are recorded separately, each to a Chrome trace JSON in `out_dir` (open in chrome://tracing or Perfetto)."""
    import time

    from torch.profiler import ProfilerActivity

    if prompt_len < 1 or new_tokens < 2 or batch_size < 1:
        raise ValueError(f"need prompt_len >= 1, new_tokens >= 2, batch_size >= 1; got {prompt_len}, {new_tokens}, "
                         f"{batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = llm.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, llm.cfg.vocab_size, (batch_size, prompt_len), generator=gen).tolist()
    kv_bytes = llm.kv_cache_bytes(batch_size, prompt_len + new_tokens)
    engine, model = llm.engine, llm.model
    # Graph replay and the one-call CPU decode step would hide the ranges: profile the modules.
    saved_decode, engine.decode = engine.decode, "dynamic"
    saved_calls, model.decode_stack = model.decode_stack, None

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    report = ProfileReport(str(device), dtype_name(llm.dtype), batch_size, prompt_len, new_tokens,
                           len(llm.plan.kept_attn_layers), llm.cfg.num_layers)
    try:
        for _ in engine.stream(prompts, 2):  # warm-up: allocator, kernels, thread pools
            pass
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        report.memory.append(_memory_point(llm, "weights loaded", 0))
        with ranges_enabled(llm.model):
            steps = engine.stream(prompts, new_tokens)
            with torch.profiler.profile(activities=activities) as prefill_prof:
                sync()
                t0 = time.perf_counter()
                with torch.profiler.record_function("prefill"):
                    next(steps)  # the prefill pass and the first sampled token
                sync()
                prefill_s = time.perf_counter() - t0
            report.memory.append(_memory_point(llm, "after prefill (cache allocated)", kv_bytes))
            with torch.profiler.profile(activities=activities) as decode_prof:
                t0 = time.perf_counter()
                with torch.profiler.record_function("decode"):
                    decoded = sum(1 for _ in steps)
                sync()
                decode_s = time.perf_counter() - t0
            report.memory.append(_memory_point(llm, "after decode", kv_bytes))
    finally:
        engine.decode, model.decode_stack = saved_decode, saved_calls
    for prof, name, tokens, wall in ((prefill_prof, "prefill", batch_size * prompt_len, prefill_s),
                                     (decode_prof, "decode", batch_size * decoded, decode_s)):
        trace = out_dir / f"trace_{name}.json"
        prof.export_chrome_trace(str(trace))
        report.phases.append(_summarise(prof, name, tokens, wall, cuda, trace, top))
    write_json(out_dir / "profile.json", report.to_dict())
    return report
