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

from ..config import DropPlan
from ..model.layers import cap_logits
from .calibration import CalibrationSet
from .sources import LayerSource, Module, ScoringError, StepContexts, batch_slices, progress_bar

KINDS = ("attn", "mlp", "block")
METRICS = ("cosine", "bi", "angular", "loss")
METRIC_SOURCES = {
    "cosine": "LLM-Drop (He et al. 2024, arXiv 2406.15786): 1 - mean token cosine(X, X + module(X))",
    "cosine_no_residual": "LLM-Drop ablation 'w/o residual': 1 - mean token cosine(norm(X), module(norm(X)))",
    "bi": "ShortGPT Block Influence (Men et al. 2024, arXiv 2403.03853): 1 - E_tokens cos(X_in, X_out)",
    "angular": "Gromov et al. 2024 (arXiv 2403.17887): arccos(cos(x_T in, x_T out)) / pi, last token",
    "loss": "SLEB (Song et al. 2024, arXiv 2402.09025): calibration loss increase when the module is removed",
}


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
    batches = batch_slices(n, batch_size)
    contexts = StepContexts(source, calib)
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

    for i in progress_bar(range(cfg.num_layers), progress, "scoring layers"):
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
                delta = layer.attn_output(normed, ctx)
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
            "cosine_no_residual": {kind: importance(f"{kind}_nores", total_tokens, one_minus)
                                   for kind in ("attn", "mlp")},
            "bi": {kind: list(values) for kind, values in cosine.items()},
            "angular": {"attn": importance("attn_last", n, float), "mlp": importance("mlp_last", n, float),
                        "block": list(angular_windows[1])},
        },
        angular_windows, int(total_tokens), time.perf_counter() - started,
    )
    return table


@torch.inference_mode()
def loss_pass(source: LayerSource, calib: CalibrationSet, plan: DropPlan, candidates: Iterable[Module],
              batch_size: int = 8, progress: bool = True) -> tuple[float, dict[Module, float]]:
    """Calibration loss (mean next-token NLL) of `plan`, and of `plan` minus each candidate, in one streaming pass.

    One hidden-state stream per candidate forks from the base stream at the candidate's layer, so every layer is
    read once per pass; memory is (candidates + 1) x samples x seq_len x hidden.
    """
    cfg = source.cfg
    n = calib.n_samples
    batches = batch_slices(n, batch_size)
    contexts = StepContexts(source, calib)
    by_layer: dict[int, list[Module]] = {}
    for module in candidates:
        by_layer.setdefault(module[1], []).append(module)
    base = torch.cat([source.embed(calib.tokens[s]).cpu() for s in batches])
    streams: dict[Module, torch.Tensor] = {}
    for i in progress_bar(range(cfg.num_layers), progress, "loss pass layers"):
        if not (plan.has_attn(i) or plan.has_mlp(i)):
            continue
        layer = source.layer(i, plan)
        for s in batches:
            ctx = contexts.get(s)
            for (kind, fork_layer), hidden in streams.items():
                if fork_layer < i:  # streams forked at this layer already hold its output
                    hidden[s] = layer(hidden[s].to(source.device), ctx).to(hidden.device)
            x = base[s].to(source.device)
            for module in by_layer.get(i, ()):
                streams.setdefault(module, torch.empty_like(base))[s] = layer(x, ctx, skip=module[0])
            base[s] = layer(x, ctx).to(base.device)
        del layer
    norm, head = source.head()

    def mean_nll(hidden):
        total = 0.0
        count = 0
        for s in batches:
            logits = cap_logits(head(norm(hidden[s].to(source.device))), cfg).float()
            labels = calib.tokens[s, 1:].to(source.device)
            scored = (calib.valid[s, 1:] & calib.valid[s, :-1]).to(source.device)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none")
            total += float((nll * scored.flatten()).double().sum())
            count += int(scored.sum())
        return total / count

    return mean_nll(base), {module: mean_nll(hidden) for module, hidden in streams.items()}


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
