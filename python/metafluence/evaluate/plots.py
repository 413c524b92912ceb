"""Matplotlib figures of the evaluation (Agg backend; each function writes one PNG).

The one home of the package's plots: the run report (:mod:`metafluence.report.render`) draws its
figures with these functions. Detection curves come from
:func:`metafluence.evaluate.detection.detection_curve` (``{"fraction", "recall", "fpr"}``);
the area under an ROC curve drawn here is ``∫ TPR dFPR`` (trapezoid rule, = the Mann-Whitney AUC).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "change_plot",
    "detection_plot",
    "line_plot",
    "scatter_pred_vs_actual",
    "score_histograms",
    "task_gallery",
]


def _plt() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path, tight: bool = True) -> Path:
    """Lay out ``fig`` (``tight_layout`` unless ``tight=False``), write it to ``path`` (PNG,
    110 dpi; parents created) and close it."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _np(x: Any) -> np.ndarray:
    """A float64 NumPy vector from a Tensor, a list of Tensors (concatenated) or array-likes."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().double().cpu().reshape(-1).numpy()
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
            return torch.cat([t.detach().double().cpu().reshape(-1) for t in x]).numpy()
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
    return _save(plt, fig, path)


def _recall_panel(
    ax: Any,
    curves: Mapping[str, Mapping[str, Any]],
    xlabel: str,
    ylabel: str,
    chance: str,
    positive_rate: float | None,
) -> None:
    """Recall against the fraction inspected, the chance diagonal and, given the positive rate
    ``p``, the perfect ranking ``recall = min(1, fraction / p)``."""
    for name, c in curves.items():
        ax.plot(_np(c["fraction"]), _np(c["recall"]), label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label=chance)
    if positive_rate is not None:
        ax.plot([0, positive_rate, 1], [0, 1, 1], ":", color="gray", label="perfect")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def detection_plot(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    title: str = "flipped-label detection",
    *,
    roc: bool = False,
    positive_rate: float | None = None,
    items: str = "items",
) -> Path:
    """Recall against the fraction inspected, one line per method (``detection_curve`` dicts).

    With ``roc=True`` a second figure layout: the ROC curve (TPR against FPR, each labelled with
    its AUC ``∫ TPR dFPR``) on the left, the recall curve on the right. ``positive_rate``
    (``n₊/n``) adds the perfect ranking; ``items`` names what is inspected in the axis labels.
    """
    plt = _plt()
    if not roc:
        fig, ax = plt.subplots(figsize=(5, 4))
        _recall_panel(ax, curves, "fraction inspected", "recall of flipped items", "chance", None)
        ax.set_title(title)
        ax.legend(fontsize=8)
        return _save(plt, fig, path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, c in curves.items():
        fpr, tpr = _np(c["fpr"]), _np(c["recall"])
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoid rule
        left.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    left.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    left.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {title}")
    left.legend(loc="lower right")
    _recall_panel(
        right,
        curves,
        f"fraction of {items} inspected (most harmful first)",
        "recall",
        "random order",
        positive_rate,
    )
    right.set_title("Detection curve")
    right.legend(loc="lower right")
    return _save(plt, fig, path)


def score_histograms(panels: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Overlaid histograms of scores, clean against flagged items, one panel per entry.

    Each panel: ``{"scores", "flagged"}`` (same shape; ``flagged`` bool), ``"title"``,
    ``"xlabel"``, ``"ylabel"`` and ``"labels"`` = ``(clean label, flagged label)`` (``{n}`` in a
    label is replaced by the item count). 30 shared bins over the scores' range, a line at 0
    (the sign of a removal effect: ``< 0`` harmful).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        s = _np(panel["scores"])
        m = _np(panel["flagged"]).astype(bool)
        bins: Any = np.linspace(s.min(), s.max(), 31) if s.size and s.max() > s.min() else 10
        clean, flagged = panel["labels"]
        ax.hist(s[~m], bins=bins, alpha=0.6, label=clean.format(n=(~m).sum()), color="tab:blue")
        ax.hist(s[m], bins=bins, alpha=0.6, label=flagged.format(n=m.sum()), color="tab:red")
        ax.axvline(0, color="k", lw=0.8)
        ax.set(xlabel=panel["xlabel"], ylabel=panel["ylabel"], title=panel["title"])
        ax.legend()
    return _save(plt, fig, path)


def change_plot(
    change: Mapping[str, float],
    accuracy: Mapping[str, tuple[float, float]],
    path: str | Path,
    title: str,
) -> Path:
    """Bars of the target-loss change per estimate (predicted, edited, retrained, ...) and, per
    model, grouped bars of ``(target accuracy, test accuracy)`` after adaptation."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(change)
    colors = ["tab:gray", "tab:orange", "tab:green", "tab:purple"][: len(names)]
    axes[0].bar(names, [change[n] for n in names], color=colors)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set(ylabel="Δ target loss", title=title)
    models = list(accuracy)
    x = np.arange(len(models))
    axes[1].bar(x - 0.2, [accuracy[k][0] for k in models], 0.4, label="target (val)")
    axes[1].bar(x + 0.2, [accuracy[k][1] for k in models], 0.4, label="test")
    axes[1].set_xticks(x, [k.replace(" (all tasks)", "\n(all tasks)") for k in models])
    lo = min(min(accuracy[k]) for k in models) if models else 0.0
    axes[1].set_ylim(max(0.0, lo - 0.05), None)
    axes[1].set(ylabel="accuracy after adaptation", title="Meta-test accuracy")
    axes[1].legend()
    return _save(plt, fig, path)


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
    return _save(plt, fig, path)


def _image(x: Any) -> np.ndarray:
    """One input ``[C, H, W]`` (C = 1 or 3) or ``[H, W]`` as a displayable ``[H, W(, 3)]`` array
    scaled to ``[0, 1]`` (min-max per image)."""
    a = np.asarray(x.detach().double().cpu().numpy() if hasattr(x, "detach") else x, float)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def task_gallery(rows: Sequence[Mapping[str, Any]], path: str | Path, max_query: int = 8) -> Path:
    """One row of images per task: its support points, then up to ``max_query`` query points.

    Each ``rows`` entry: ``title`` (str), ``support_x`` ``[n, C, H, W]``, ``support_y`` /
    ``support_pred`` ``[n]`` (given labels, labels the adapted model predicts), optional
    ``support_harmful`` ``[n]`` bool (drawn with a thick red frame), ``query_x`` ``[m, C, H, W]``,
    ``query_y`` / ``query_pred`` ``[m]``. Each image is captioned ``y→pred``, red where they
    differ.
    """
    plt = _plt()
    cols = max(len(r["support_y"]) + min(max_query, len(r["query_y"])) for r in rows) if rows else 1
    fig, axes = plt.subplots(
        len(rows) or 1, cols, figsize=(0.95 * cols + 0.4, 1.3 * max(1, len(rows))), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, row in enumerate(rows):
        n = len(row["support_y"])
        harmful = row.get("support_harmful")
        items = [
            ("S", row["support_x"][j], row["support_y"][j], row["support_pred"][j],
             bool(harmful[j]) if harmful is not None else False)
            for j in range(n)
        ] + [
            ("Q", row["query_x"][j], row["query_y"][j], row["query_pred"][j], False)
            for j in range(min(max_query, len(row["query_y"])))
        ]  # fmt: skip
        for c, (kind, x, y, pred, flag) in enumerate(items):
            ax = axes[r, c]
            img = _image(x)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("red" if flag else ("#999" if kind == "S" else "#ccc"))
                side.set_linewidth(3 if flag else 0.8)
            wrong = int(y) != int(pred)
            ax.set_xlabel(
                f"{kind} {int(y)}→{int(pred)}", fontsize=7, color="red" if wrong else "black"
            )
        axes[r, 0].set_title(row["title"], fontsize=8, loc="left")
    # a fixed layout: tight_layout shrinks every tile to fit a title wider than one tile
    height = fig.get_figheight()
    fig.subplots_adjust(
        left=0.01, right=0.99, top=1 - 0.3 / height, bottom=0.25 / height, hspace=0.55, wspace=0.1
    )
    return _save(plt, fig, path, tight=False)
