"""Scoring pass and drop planning on the runtime's own decoder stack.

Metrics (importance: higher = more important; the least important modules are dropped):
- `cosine` (LLM-Drop, He et al. 2024): 1 - cos(X, Y) per token, averaged over all calibration tokens (padding
  excluded), in fp32. Attention: X = residual stream entering the attention sub-block, Y = X + attn(norm(X));
  MLP likewise with its own norm; block: decoder-layer input vs output.
  `cosine_no_residual` is the paper's ablation: X = norm(X), Y = the module's own output (attention/MLP only).
- `bi` (ShortGPT Block Influence, Men et al. 2024): 1 - E_tokens[cos(X_i, X_{i+1})] between the residual stream
  entering and leaving a module. By definition this is the same number as `cosine` with residual; both names are
  kept so each paper's metric can be asked for by its own name.
- `angular` (Gromov et al. 2024): arccos(cos(x_T^l, x_T^{l+n})) / pi between the residual stream entering layer l
  and entering layer l+n, last (valid) token only, averaged over samples. Block drop picks the contiguous n-layer
  window with the smallest distance; for attention/MLP modules the per-module distance (input vs output of the
  sub-block at the last token) is ranked.
- `loss` (SLEB, Song et al. 2024): the calibration loss after removing the module, minus the loss before; SLEB
  removes the cheapest module, re-evaluates, and repeats (our `iterative` mode).

Memory: layer streaming. The hidden states of every calibration sample at the current layer live on the CPU; one
decoder layer at a time is read from safetensors (`ModelBuilder.layer(i)`, only its kept weights), run over all
samples and released, so the model's resident memory is about one layer plus activations.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from . import ops
from .calibration import CalibrationSet
from .checkpoint import CheckpointReader
from .config import DropPlan, ModelConfig
from .model import DecoderLayer, ModelBuilder, Transformer, step_context

KINDS = ("attn", "mlp", "block")
GRANULARITIES = ("block", "attn", "mlp", "joint")
METRICS = ("cosine", "bi", "angular", "loss")
MODES = ("one-shot", "iterative")
METRIC_SOURCES = {
    "cosine": "LLM-Drop (He et al. 2024, arXiv 2406.15786): 1 - mean token cosine(X, X + module(X))",
    "cosine_no_residual": "LLM-Drop ablation 'w/o residual': 1 - mean token cosine(norm(X), module(norm(X)))",
    "bi": "ShortGPT Block Influence (Men et al. 2024, arXiv 2403.03853): 1 - E_tokens cos(X_in, X_out)",
    "angular": "Gromov et al. 2024 (arXiv 2403.17887): arccos(cos(x_T in, x_T out)) / pi, last token",
    "loss": "SLEB (Song et al. 2024, arXiv 2402.09025): calibration loss increase when the module is removed",
}

Module = tuple[str, int]  # ("attn" | "mlp" | "block", layer index)


class ScoringError(ValueError):
    """A scoring or selection request that cannot be honoured (names the option and the limit)."""


# ---- where the decoder layers come from ----------------------------------------------------------------------


class LayerSource:
    """Hands out the embedding, one decoder layer at a time, and the output head."""

    cfg: ModelConfig
    dtype: torch.dtype
    device: torch.device
    folder: Path | None = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer(self, index: int, plan: DropPlan) -> DecoderLayer:
        raise NotImplementedError

    def head(self) -> tuple[torch.nn.Module, torch.Tensor]:
        """(final norm, output projection weight)."""
        raise NotImplementedError

    def inv_freq(self) -> torch.Tensor:
        return self.cfg.rope.inverse_frequencies(self.cfg.head_dim)


class StreamingSource(LayerSource):
    """Reads each piece from the checkpoint when asked and keeps nothing: the caller drops it after use.

    Each piece gets its own short-lived CheckpointReader, so the safetensors memory maps are closed once the piece
    is built: pages of layers already scored do not linger in the process's resident memory.
    """

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu"):
        self.folder = Path(folder)
        self.cfg = ModelConfig.from_folder(self.folder)
        CheckpointReader(self.folder)  # fail early on a missing or broken checkpoint
        self.dtype, self.device = dtype, torch.device(device)
        self.base_plan = DropPlan.from_config(self.cfg)
        self.bytes_read = 0  # weights read so far, over all pieces

    def builder(self, plan: DropPlan) -> ModelBuilder:
        return ModelBuilder(self.cfg, plan, CheckpointReader(self.folder), self.dtype, self.device)

    def _built(self, plan: DropPlan, build):
        builder = self.builder(plan)
        piece = build(builder)
        self.bytes_read += builder.reader.bytes_read
        return piece

    def embed(self, tokens):
        table = self._built(self.base_plan, ModelBuilder.embedding)
        return F.embedding(tokens.to(self.device), table)

    def layer(self, index, plan):
        return self._built(plan, lambda builder: builder.layer(index))

    def head(self):
        def build(builder):
            weight = builder.lm_head()
            return builder.final_norm(), builder.embedding() if weight is None else weight

        return self._built(self.base_plan, build)


class InMemorySource(LayerSource):
    """A whole built model (every kept module resident): the reference the streaming source must match."""

    def __init__(self, model: Transformer, folder: str | Path | None = None):
        self.model, self.cfg = model, model.cfg
        self.dtype, self.device = model.embed.weight.dtype, model.embed.weight.device
        self.folder = Path(folder) if folder else None

    @classmethod
    def from_folder(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> "InMemorySource":
        cfg = ModelConfig.from_folder(folder)
        builder = ModelBuilder(cfg, DropPlan.from_config(cfg), CheckpointReader(folder), dtype, torch.device(device))
        return cls(builder.build(), folder)

    def embed(self, tokens):
        return self.model.embed(tokens.to(self.device))

    def layer(self, index, plan):
        layer = self.model.layers[index]
        if (plan.has_attn(index) and layer.attn is None) or (plan.has_mlp(index) and layer.mlp is None):
            raise ScoringError(f"layer {index}: the plan keeps a module this in-memory model was built without")
        return layer

    def head(self):
        return self.model.norm, self.model.lm_head


def run_layer(layer: DecoderLayer, plan: DropPlan, x, ctx, skip: str | None = None):
    """The layer's residual update under `plan`, optionally without one of its modules (or the whole block)."""
    i = layer.index
    if plan.has_attn(i) and skip not in ("attn", "block"):
        x = x + layer.attn_delta(x, ctx)
    if plan.has_mlp(i) and skip not in ("mlp", "block"):
        x = x + layer.mlp_delta(x)
    return x


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def _progress(iterable, enabled: bool, desc: str, total=None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


class _Contexts:
    """StepContexts per batch shape (rotary tables + mask), built once."""

    def __init__(self, source: LayerSource, calib: CalibrationSet):
        self.source, self.calib, self.inv_freq, self.cache = source, calib, source.inv_freq(), {}

    def get(self, s: slice):
        valid = self.calib.valid[s]
        padded = not bool(valid.all())
        key = (s.stop - s.start, padded and (s.start, s.stop))
        if key not in self.cache:
            b, t = valid.shape
            device = self.source.device
            positions = torch.arange(t, device=device).expand(b, t)
            self.cache[key] = step_context(self.source.cfg, self.inv_freq.to(device), positions,
                                           key_valid=valid.to(device) if padded else None)
        return self.cache[key]


# ---- the scoring pass ----------------------------------------------------------------------------------------


@dataclass
class ScoreTable:
    """Per-layer importance of every module for each metric (None where the module is already dropped)."""

    num_layers: int
    plan: DropPlan
    importance: dict[str, dict[str, list[float | None]]]
    angular_windows: dict[int, list[float | None]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def values(self, metric: str, kind: str) -> list[float | None]:
        if metric not in self.importance:
            raise ScoringError(f"metric {metric!r} was not computed (have: {sorted(self.importance)})")
        if kind not in self.importance[metric]:
            raise ScoringError(f"metric {metric!r} has no {kind} scores (have: {sorted(self.importance[metric])})")
        return self.importance[metric][kind]


def _angle(cos: torch.Tensor) -> torch.Tensor:
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.inference_mode()
def score_pass(source: LayerSource, calib: CalibrationSet, plan: DropPlan | None = None, batch_size: int = 8,
               progress: bool = True) -> ScoreTable:
    """One layer-streaming pass computing `cosine`, `cosine_no_residual`, `bi` and `angular` for every kept module."""
    started = time.perf_counter()
    cfg = source.cfg
    plan = plan or DropPlan.from_config(cfg)
    n, t = calib.tokens.shape
    if t > cfg.max_position_embeddings:
        raise ScoringError(f"seq_len {t} exceeds the model's context of {cfg.max_position_embeddings}")
    batches = _batches(n, batch_size)
    contexts = _Contexts(source, calib)
    weights = calib.valid.float()  # per-token weight in every average: padding counts 0
    total_tokens = float(weights.sum())
    if total_tokens == 0:
        raise ScoringError("the calibration set has no valid tokens")
    last = (calib.valid.long().cumsum(1).argmax(1))  # index of each sample's last valid token
    rows = torch.arange(n)

    hidden = torch.cat([source.embed(calib.tokens[s]).cpu() for s in batches])
    last_inputs = torch.empty(cfg.num_layers + 1, n, cfg.hidden_size)  # residual stream entering each layer
    sums = {key: [None] * cfg.num_layers for key in
            ("attn", "mlp", "block", "attn_nores", "mlp_nores", "attn_last", "mlp_last")}

    def cos_sum(a, b, w):
        return float((F.cosine_similarity(a.float(), b.float(), dim=-1) * w).double().sum())

    for i in _progress(range(cfg.num_layers), progress, "scoring layers"):
        last_inputs[i] = hidden[rows, last].float()
        has_attn, has_mlp = plan.has_attn(i), plan.has_mlp(i)
        if not (has_attn or has_mlp):
            continue
        layer = source.layer(i, plan)
        acc = dict.fromkeys(sums, 0.0)
        for s in batches:
            x = hidden[s].to(source.device)
            w = weights[s].to(source.device)
            ends = (rows[s] - s.start, last[s])
            ctx = contexts.get(s)
            y = x
            if has_attn:
                normed = layer.attn_norm(x)
                delta = layer.attn(normed, ctx)
                y = x + delta
                acc["attn"] += cos_sum(x, y, w)
                acc["attn_nores"] += cos_sum(normed, delta, w)
                acc["attn_last"] += float(_angle(F.cosine_similarity(x[ends].float(), y[ends].float(), dim=-1)).sum())
            if has_mlp:
                delta = layer.mlp_delta(y)  # (on GPUs the norm may be fused into the MLP kernel)
                z = y + delta
                acc["mlp"] += cos_sum(y, z, w)
                acc["mlp_nores"] += cos_sum(layer.mlp_norm(y), delta, w)
                acc["mlp_last"] += float(_angle(F.cosine_similarity(y[ends].float(), z[ends].float(), dim=-1)).sum())
                y = z
            acc["block"] += cos_sum(x, y, w)
            hidden[s] = y.to(hidden.device)
        del layer  # streaming: this layer's weights are released before the next is read
        for key in sums:
            if key.startswith("attn") and not has_attn or key.startswith("mlp") and not has_mlp:
                continue
            sums[key][i] = acc[key]
    last_inputs[cfg.num_layers] = hidden[rows, last].float()

    def importance(key, denominator, transform):
        return [None if v is None else transform(v / denominator) for v in sums[key]]

    one_minus = lambda mean_cos: 1.0 - mean_cos  # noqa: E731
    cosine = {kind: importance(kind, total_tokens, one_minus) for kind in KINDS}
    angular_windows = {}
    for width in range(1, cfg.num_layers + 1):
        distances = _angle(F.cosine_similarity(last_inputs[:-width], last_inputs[width:], dim=-1)).mean(dim=1)
        angular_windows[width] = [
            None if any(not (plan.has_attn(j) or plan.has_mlp(j)) for j in range(start, start + width))
            else float(distances[start])
            for start in range(cfg.num_layers - width + 1)
        ]
    table = ScoreTable(
        cfg.num_layers, plan,
        {
            "cosine": cosine,
            "cosine_no_residual": {kind: importance(f"{kind}_nores", total_tokens, one_minus) for kind in ("attn", "mlp")},
            "bi": {kind: list(values) for kind, values in cosine.items()},
            "angular": {"attn": importance("attn_last", n, float), "mlp": importance("mlp_last", n, float),
                        "block": list(angular_windows[1])},
        },
        angular_windows, int(total_tokens), time.perf_counter() - started,
    )
    return table


# ---- the loss pass (SLEB) ------------------------------------------------------------------------------------


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


@torch.inference_mode()
def loss_pass(source: LayerSource, calib: CalibrationSet, plan: DropPlan, candidates: Iterable[Module],
              batch_size: int = 8, progress: bool = True) -> tuple[float, dict[Module, float]]:
    """Calibration loss (mean next-token NLL) of `plan`, and of `plan` minus each candidate, in one streaming pass.

    One hidden-state stream per candidate forks from the base stream at the candidate's layer, so every layer is
    read once per pass; memory is (candidates + 1) x samples x seq_len x hidden.
    """
    cfg = source.cfg
    n = calib.n_samples
    batches = _batches(n, batch_size)
    contexts = _Contexts(source, calib)
    by_layer: dict[int, list[Module]] = {}
    for module in candidates:
        by_layer.setdefault(module[1], []).append(module)
    base = torch.cat([source.embed(calib.tokens[s]).cpu() for s in batches])
    streams: dict[Module, torch.Tensor] = {}
    for i in _progress(range(cfg.num_layers), progress, "loss pass layers"):
        if not (plan.has_attn(i) or plan.has_mlp(i)):
            continue
        layer = source.layer(i, plan)
        for s in batches:
            ctx = contexts.get(s)
            for (kind, fork_layer), hidden in streams.items():
                if fork_layer < i:  # streams forked at this layer already hold its output
                    hidden[s] = run_layer(layer, plan, hidden[s].to(source.device), ctx).to(hidden.device)
            x = base[s].to(source.device)
            for module in by_layer.get(i, ()):
                streams.setdefault(module, torch.empty_like(base))[s] = run_layer(layer, plan, x, ctx, skip=module[0])
            base[s] = run_layer(layer, plan, x, ctx).to(base.device)
        del layer
    norm, head = source.head()

    def mean_nll(hidden):
        total = 0.0
        count = 0
        for s in batches:
            logits = ops.linear(norm(hidden[s].to(source.device)), head).float()
            labels = calib.tokens[s, 1:].to(source.device)
            scored = (calib.valid[s, 1:] & calib.valid[s, :-1]).to(source.device)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none")
            total += float((nll * scored.flatten()).double().sum())
            count += int(scored.sum())
        return total / count

    return mean_nll(base), {module: mean_nll(hidden) for module, hidden in streams.items()}


# ---- selection -----------------------------------------------------------------------------------------------


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
        for _ in _progress(range(k), progress, f"iterative {metric} {granularity} drop"):
            tables.append(score(current))
            chosen = select(tables[-1], metric, granularity, 1, current, protect_first, protect_last, residual)
            order.extend(chosen)
            current = with_dropped(current, chosen)
    return DropResult(with_dropped(plan, order), order, metric, granularity, mode, tables,
                      time.perf_counter() - started)


# ---- the scores file -----------------------------------------------------------------------------------------


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over config.json (minus drop lists) and every safetensors header (names, dtypes, shapes, offsets):
    cheap for any size, and changes when the weights' layout or the architecture does."""
    folder = Path(folder)
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    config.pop("drop_attn_list", None)
    config.pop("drop_mlp_list", None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(path.name.encode())
            digest.update(f.read(header_len))
    return digest.hexdigest()


def scores_to_dict(table: ScoreTable, source: LayerSource, calib: CalibrationSet | None) -> dict:
    def rounded(values):
        return [None if v is None else round(v, 9) for v in values]

    return {
        "format": "llmdrop-rt-scores/1",
        "model": {
            "path": str(source.folder) if source.folder else None,
            "fingerprint": model_fingerprint(source.folder) if source.folder else None,
            "architecture": source.cfg.architecture,
            "num_layers": source.cfg.num_layers,
        },
        "calibration": {**calib.settings.to_dict(), "tokens": table.tokens} if calib else None,
        "plan": table.plan.to_config_lists(),
        "importance": {metric: {kind: rounded(v) for kind, v in kinds.items()}
                       for metric, kinds in table.importance.items()},
        "angular_windows": {str(width): rounded(v) for width, v in table.angular_windows.items()},
        "metric_sources": {m: METRIC_SOURCES[m] for m in table.importance if m in METRIC_SOURCES},
        "seconds": round(table.seconds, 3),
    }


def table_from_dict(data: dict) -> ScoreTable:
    if data.get("format") != "llmdrop-rt-scores/1":
        raise ScoringError(f"not an llmdrop-rt scores file (format {data.get('format')!r})")
    num_layers = data["model"]["num_layers"]
    plan = DropPlan.create(num_layers, data["plan"]["drop_attn_list"], data["plan"]["drop_mlp_list"])
    windows = {int(w): v for w, v in data.get("angular_windows", {}).items()}
    return ScoreTable(num_layers, plan, data["importance"], windows, data["calibration"]["tokens"]
                      if data.get("calibration") else 0, data.get("seconds", 0.0))


def write_json(path: str | Path, data: dict):
    """Write to a temporary sibling, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
