"""Choosing what to drop: candidates, ranking by a metric, one-shot or iterative plans (Block / Layer / Joint
Layer Drop), and the SLEB loss table."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from ..config import DropPlan
from .calibration import CalibrationSet
from .metrics import METRICS, ScoreTable, loss_pass, score_pass
from .sources import LayerSource, Module, ScoringError, progress_bar

GRANULARITIES = ("block", "attn", "mlp", "joint")
MODES = ("one-shot", "iterative")


def _module_present(plan: DropPlan, module: Module) -> bool:
    kind, i = module
    if kind == "attn":
        return plan.has_attn(i)
    if kind == "mlp":
        return plan.has_mlp(i)
    return plan.has_attn(i) or plan.has_mlp(i)


def candidate_modules(plan: DropPlan, granularity: str, protect_first: int = 0, protect_last: int = 0) -> list[Module]:
    """Modules still present that may be dropped, in layer order; joint = attention and MLP together."""
    if granularity not in GRANULARITIES:
        raise ScoringError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    for name, value in (("protect_first", protect_first), ("protect_last", protect_last)):
        if not 0 <= value <= plan.num_layers:
            raise ScoringError(f"{name} must be in 0..{plan.num_layers}, got {value}")
    kinds = ("attn", "mlp") if granularity == "joint" else (granularity,)
    layers = range(protect_first, plan.num_layers - protect_last)
    return [(kind, i) for i in layers for kind in kinds if _module_present(plan, (kind, i))]


def with_dropped(plan: DropPlan, modules: Iterable[Module]) -> DropPlan:
    attn, mlp = set(plan.drop_attn), set(plan.drop_mlp)
    for kind, i in modules:
        if kind in ("attn", "block"):
            attn.add(i)
        if kind in ("mlp", "block"):
            mlp.add(i)
    return DropPlan.create(plan.num_layers, sorted(attn), sorted(mlp))


def _metric_key(metric: str, residual: bool) -> str:
    if metric not in METRICS:
        raise ScoringError(f"metric {metric!r} is not one of {METRICS}")
    if not residual:
        if metric != "cosine":
            raise ScoringError(f"the 'without residual' option exists for the cosine metric only, not {metric!r}")
        return "cosine_no_residual"
    return metric


def rank_modules(table: ScoreTable, metric_key: str, candidates: list[Module]) -> list[tuple[float, Module]]:
    """Candidates sorted from least to most important (ties: lower layer first, attention before MLP)."""
    ranked = []
    for kind, i in candidates:
        value = table.values(metric_key, kind)[i]
        if value is None:  # already dropped: never re-selected
            continue
        ranked.append((value, (kind, i)))
    order = {"attn": 0, "mlp": 1, "block": 2}
    return sorted(ranked, key=lambda item: (item[0], item[1][1], order[item[1][0]]))


def best_window(table: ScoreTable, width: int, protect_first: int = 0, protect_last: int = 0) -> list[int]:
    """Gromov et al.: the start l minimising the angular distance between the inputs of layers l and l+width."""
    L = table.num_layers
    if not 1 <= width <= L - protect_first - protect_last:
        raise ScoringError(f"cannot drop a window of {width} layers from {L} layers "
                           f"with {protect_first} first and {protect_last} last protected")
    distances = table.angular_windows[width]
    starts = [s for s in range(protect_first, L - protect_last - width + 1) if distances[s] is not None]
    if not starts:
        raise ScoringError(f"no window of {width} layers left that avoids protected and already-dropped layers")
    start = min(starts, key=lambda s: (distances[s], s))
    return list(range(start, start + width))


def select(table: ScoreTable, metric: str, granularity: str, k: int, plan: DropPlan | None = None,
           protect_first: int = 0, protect_last: int = 0, residual: bool = True) -> list[Module]:
    """The k modules to drop given one score table (one-shot), least important first."""
    plan = plan or table.plan
    key = _metric_key(metric, residual)
    candidates = candidate_modules(plan, granularity, protect_first, protect_last)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ScoringError(f"the number of modules to drop must be a positive integer, got {k!r}")
    if k > len(candidates):
        raise ScoringError(f"asked to drop {k} {granularity} modules, but only {len(candidates)} are left "
                           f"to choose from (after protection and earlier drops)")
    if metric == "angular" and granularity == "block" and k > 1:
        return [("block", i) for i in best_window(table, k, protect_first, protect_last)]
    ranked = rank_modules(table, key, candidates)
    return [module for _, module in ranked[:k]]


@dataclass
class DropResult:
    """A drop decision: the resulting plan, the modules in the order chosen, and the scores behind it."""

    plan: DropPlan
    order: list[Module]
    metric: str
    granularity: str
    mode: str
    tables: list[ScoreTable]
    seconds: float

    def to_dict(self) -> dict:
        return {"metric": self.metric, "granularity": self.granularity, "mode": self.mode, "k": len(self.order),
                "order": [list(m) for m in self.order], **self.plan.to_config_lists(),
                "seconds": round(self.seconds, 3)}


def loss_table(source: LayerSource, calib: CalibrationSet, plan: DropPlan, granularity: str, protect_first: int,
               protect_last: int, batch_size: int, progress: bool) -> ScoreTable:
    """A ScoreTable whose `loss` metric holds, per candidate module, the loss increase its removal causes."""
    started = time.perf_counter()
    candidates = candidate_modules(plan, granularity, protect_first, protect_last)
    base, losses = loss_pass(source, calib, plan, candidates, batch_size, progress)
    kinds = ("attn", "mlp") if granularity == "joint" else (granularity,)
    importance = {kind: [None] * plan.num_layers for kind in kinds}
    for (kind, i), value in losses.items():
        importance[kind][i] = value - base
    return ScoreTable(plan.num_layers, plan, {"loss": importance}, {}, int(calib.valid.sum()),
                      time.perf_counter() - started)


def plan_drops(source: LayerSource, calib: CalibrationSet, metric: str, granularity: str, k: int,
               mode: str = "one-shot", plan: DropPlan | None = None, protect_first: int = 0, protect_last: int = 0,
               residual: bool = True, batch_size: int = 8, progress: bool = True) -> DropResult:
    """Choose k modules to drop. one-shot: score once, take the k least important. iterative: drop the least
    important one, re-score the smaller model, repeat (SLEB's procedure for `loss`)."""
    if mode not in MODES:
        raise ScoringError(f"mode {mode!r} is not one of {MODES}")
    started = time.perf_counter()
    plan = plan or DropPlan.from_config(source.cfg)
    _metric_key(metric, residual)
    candidates = candidate_modules(plan, granularity, protect_first, protect_last)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(candidates):
        raise ScoringError(f"asked to drop {k!r} {granularity} modules, but only {len(candidates)} are left to "
                           f"choose from (after protection and earlier drops)")

    def score(current: DropPlan) -> ScoreTable:
        if metric == "loss":
            return loss_table(source, calib, current, granularity, protect_first, protect_last, batch_size, progress)
        return score_pass(source, calib, current, batch_size, progress)

    tables, order = [], []
    if mode == "one-shot":
        tables.append(score(plan))
        order = select(tables[0], metric, granularity, k, plan, protect_first, protect_last, residual)
    else:
        current = plan
        for _ in progress_bar(range(k), progress, f"iterative {metric} {granularity} drop"):
            tables.append(score(current))
            chosen = select(tables[-1], metric, granularity, 1, current, protect_first, protect_last, residual)
            order.extend(chosen)
            current = with_dropped(current, chosen)
    return DropResult(with_dropped(plan, order), order, metric, granularity, mode, tables,
                      time.perf_counter() - started)
