"""PNG plots: per-layer importance (attention vs MLP vs block) and perplexity against modules dropped.

matplotlib is the optional `plot` extra: `pip install llmdrop-rt[plot]` (or `pip install matplotlib`).
"""
from __future__ import annotations

from pathlib import Path

from ..io.publish import replacing


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib, the optional 'plot' extra: "
                           "pip install 'llmdrop-rt[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path):
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")


def plot_importance(importance: dict[str, list[float | None]], path: str | Path, title: str = "") -> Path:
    """Per-layer importance, one line per kind present ('attn', 'mlp', 'block'); dropped modules are gaps."""
    plt = _pyplot()
    labels = {"attn": "attention", "mlp": "MLP", "block": "block"}
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind in ("attn", "mlp", "block"):
        values = importance.get(kind)
        if values is None:
            continue
        ax.plot(range(len(values)), [float("nan") if v is None else v for v in values], marker="o", markersize=3,
                label=labels[kind])
    ax.set_xlabel("layer")
    ax.set_ylabel("importance")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_sweep(curves: dict[str, list[tuple[int, float]]], path: str | Path, baseline: float | None = None,
               title: str = "") -> Path:
    """Perplexity vs number of dropped modules, one curve per label (e.g. 'attn (cosine)'); log-scale y."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        ks, ppls = zip(*sorted(points)) if points else ((), ())
        ax.plot(ks, ppls, marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label=f"no drop ({baseline:.2f})")
    ax.set_yscale("log")
    ax.set_xticks(sorted({k for points in curves.values() for k, _ in points}))
    ax.set_xlabel("modules dropped")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return Path(path)
