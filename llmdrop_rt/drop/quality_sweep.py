"""Quality sweep: for several (metric, granularity, mode) methods, choose k = k1, k2, ... modules to drop and
measure the perplexity of each dropped model. One scoring pass serves every one-shot cosine/bi/angular method;
iterative and `loss` methods run once up to the largest k (their first k choices are the plan for k)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import DropPlan
from ..io.checkpoint import CheckpointReader
from ..model import ModelBuilder
from .calibration import CalibrationSet
from .metrics import METRICS, score_pass
from .perplexity import evaluate_perplexity
from .selection import GRANULARITIES, MODES, plan_drops, select, with_dropped
from .sources import ScoringError, StreamingSource


@dataclass(frozen=True)
class Method:
    metric: str
    granularity: str
    mode: str = "one-shot"

    @classmethod
    def parse(cls, text: str) -> "Method":
        """'metric:granularity[:mode]', e.g. 'cosine:attn', 'loss:attn:iterative'."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise ScoringError(f"method {text!r}: expected metric:granularity[:mode]")
        method = cls(*parts)
        if method.metric not in METRICS or method.granularity not in GRANULARITIES or method.mode not in MODES:
            raise ScoringError(f"method {text!r}: metric in {METRICS}, granularity in {GRANULARITIES}, "
                               f"mode in {MODES}")
        return method

    @property
    def label(self) -> str:
        return f"{self.granularity} ({self.metric}{', iterative' if self.mode == 'iterative' else ''})"


def run_sweep(folder: str | Path, calib: CalibrationSet, eval_tokens, methods: list[Method], ks: list[int],
              seq_len: int | None = None, stride: int | None = None, loss_calib: CalibrationSet | None = None,
              protect_first: int = 0, protect_last: int = 0, batch_size: int = 8, dtype=torch.float32,
              progress: bool = True, base_plan: DropPlan | None = None) -> dict:
    """Results as a dict: the baseline perplexity and, per method, its scoring time and one point per k."""
    source = StreamingSource(folder, dtype)
    base_plan = base_plan or DropPlan.from_config(source.cfg)
    reader = CheckpointReader(folder)
    ppl_cache: dict[DropPlan, dict] = {}

    def perplexity(plan: DropPlan) -> dict:
        if plan not in ppl_cache:
            model = ModelBuilder(source.cfg, plan, reader, dtype, source.device, source.ops).build()
            ppl_cache[plan] = evaluate_perplexity(model, eval_tokens, seq_len, stride, progress=progress).to_dict()
            del model
        return ppl_cache[plan]

    results = {"baseline": perplexity(base_plan), "ks": ks, "methods": {}}
    shared_table = None
    for method in methods:
        started = time.perf_counter()
        if method.mode == "one-shot" and method.metric != "loss":
            if shared_table is None:
                shared_table = score_pass(source, calib, base_plan, batch_size, progress)
            plans = {k: with_dropped(base_plan, select(shared_table, method.metric, method.granularity, k,
                                                       base_plan, protect_first, protect_last)) for k in ks}
            seconds = shared_table.seconds
            note = "one shared scoring pass (cosine, bi and angular at every granularity)"
        else:
            calib_used = loss_calib if (method.metric == "loss" and loss_calib is not None) else calib
            result = plan_drops(source, calib_used, method.metric, method.granularity, max(ks), method.mode,
                                base_plan, protect_first, protect_last, batch_size=batch_size, progress=progress)
            plans = {k: with_dropped(base_plan, result.order[:k]) for k in ks}
            seconds = time.perf_counter() - started
            note = f"{calib_used.n_samples} x {calib_used.seq_len} calibration tokens"
        points = []
        for k, plan in plans.items():
            points.append({"k": k, **plan.to_config_lists(), **{key: perplexity(plan)[key]
                                                               for key in ("perplexity", "tokens_scored")}})
        results["methods"][method.label] = {**vars(replace(method)), "scoring_seconds": round(seconds, 2),
                                            "scoring_note": note, "points": points}
    return results
