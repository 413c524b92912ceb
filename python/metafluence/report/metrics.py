"""Detection metrics for harmful-item ranking: ROC AUC and recall at k."""

from __future__ import annotations

import numpy as np


def _arr(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().double().cpu().numpy().reshape(-1)
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x, dtype=np.float64).reshape(-1)


def roc_auc(harm: object, positive: object) -> float:
    """Probability that a random positive outranks a random negative (ties count ½).

    ``harm``: higher = more suspicious (use ``-removal_effect``); ``positive``: bool mask.
    NaN when one class is empty.
    """
    s, y = _arr(harm), _arr(positive).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(harm: object, positive: object) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rate, true positive rate)`` over thresholds, highest harm first."""
    s, y = _arr(harm), _arr(positive).astype(bool)
    order = np.argsort(-s, kind="stable")
    y = y[order]
    tp = np.r_[0, np.cumsum(y)] / max(1, int(y.sum()))
    fp = np.r_[0, np.cumsum(~y)] / max(1, int((~y).sum()))
    return fp, tp


def recall_at_k(harm: object, positive: object, k: int) -> float:
    """Fraction of positives among the ``k`` highest-harm items' positives (recall@k)."""
    s, y = _arr(harm), _arr(positive).astype(bool)
    if int(y.sum()) == 0:
        return float("nan")
    top = np.argsort(-s, kind="stable")[: int(k)]
    return float(y[top].sum() / y.sum())


def recall_curve(harm: object, positive: object) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction inspected, recall)`` when inspecting items from most harmful down."""
    s, y = _arr(harm), _arr(positive).astype(bool)
    order = np.argsort(-s, kind="stable")
    rec = np.r_[0, np.cumsum(y[order])] / max(1, int(y.sum()))
    frac = np.arange(len(s) + 1) / max(1, len(s))
    return frac, rec
