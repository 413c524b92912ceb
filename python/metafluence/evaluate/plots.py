"""Matplotlib figures of the evaluation (Agg backend; each function writes one PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _np(x: Any) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().double().cpu().reshape(-1).numpy()
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return torch.cat([t.detach().double().reshape(-1) for t in x]).numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64).reshape(-1)


def scatter_pred_vs_actual(
    series: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    title: str = "predicted vs actual Δf",
    xlabel: str = "actual Δf (retraining)",
    ylabel: str = "predicted Δf (influence)",
) -> Path:
    """One panel per entry ``name -> (predicted, actual)``, each with the y = x line."""
    plt = _plt()
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4), squeeze=False)
    for ax, (name, (pred, actual)) in zip(axes[0], series.items(), strict=True):
        p, a = _np(pred), _np(actual)
        ax.scatter(a, p, s=12, alpha=0.7)
        lo = float(min(p.min(), a.min())) if p.size else 0.0
        hi = float(max(p.max(), a.max())) if p.size else 1.0
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def detection_plot(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    title: str = "flipped-label detection",
) -> Path:
    """Recall against the fraction inspected, one line per method (``detection_curve`` dicts)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, c in curves.items():
        ax.plot(_np(c["fraction"]), _np(c["recall"]), label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set_xlabel("fraction inspected")
    ax.set_ylabel("recall of flipped items")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_plot(
    x: Sequence[float],
    ys: Mapping[str, Sequence[float]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
) -> Path:
    """Generic lines (ablations: accuracy or runtime against Neumann depth / damping)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, y in ys.items():
        ax.plot(list(x), list(y), marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
