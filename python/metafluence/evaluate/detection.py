"""Detection of flipped (mislabelled) items from scores: curve, AUC, recall@k (no sklearn).

The one implementation of the detection metrics: the run report (:mod:`metafluence.report`)
re-exports these functions, so the job and the library report the same numbers.

Signs: a removal effect is *negative* for a harmful item (removing it lowers the target loss),
so items are inspected from the most negative score up (``harmful_first=True``, the default).
Pass ``harmful_first=False`` for scores where larger means more suspicious (e.g. a loss, or the
report's ``harm = −removal_effect``).

Ties are handled as if broken at random, in expectation (never by position):

- AUC is the Mann-Whitney statistic with average ranks ``R_i`` of the suspicion ``h_i``
  (``h = −score`` when ``harmful_first``)::

      AUC = (Σ_{i flipped} R_i − n₊(n₊ + 1)/2) / (n₊ n₋) = P(h₊ > h₋) + ½ P(h₊ = h₋);

- the curve at ``k`` inspected items counts a tied group that the cut splits in proportion:
  ``TP_k = TP(before the group) + (k − start)·(flipped in group)/(group size)``, so within a
  tied group the (FPR, TPR) curve is a straight segment and its trapezoid area equals the AUC;
- ``recall@k = TP_k / n₊`` and ``precision@k = TP_k / k`` read that curve.

Without ties everything equals the rank-by-position definitions (as in dattri's
``mislabel_detection_auc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "detection_auc",
    "detection_curve",
    "inspection_order",
    "precision_at_k",
    "recall_at_k",
    "summary",
]

ArrayLike = Tensor | Sequence[Tensor] | Sequence[float] | np.ndarray
"""Scores or flags: a Tensor, per-task Tensors (concatenated), a list or a NumPy array."""


def _flat(x: Any) -> Tensor:
    """A float64 CPU vector from a Tensor, a sequence of Tensors (concatenated) or array-likes."""
    if isinstance(x, Tensor):
        return x.detach().double().cpu().reshape(-1)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return torch.cat([t.detach().double().cpu().reshape(-1) for t in x])
    return torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))


def _suspicion(scores: ArrayLike, harmful_first: bool) -> Tensor:
    """``h``: larger = inspected earlier (``−scores`` when ``harmful_first``)."""
    s = _flat(scores)
    return -s if harmful_first else s


def _labels(scores: ArrayLike, flipped: ArrayLike, harmful_first: bool) -> tuple[Tensor, Tensor]:
    h, y = _suspicion(scores, harmful_first), _flat(flipped).bool()
    if h.numel() != y.numel():
        raise ValueError(f"{h.numel()} scores but {y.numel()} flipped flags")
    return h, y


def inspection_order(scores: ArrayLike, harmful_first: bool = True) -> Tensor:
    """Positions (flattened) in the order an inspector would look at them (ties by position)."""
    return torch.argsort(-_suspicion(scores, harmful_first), stable=True)


def _true_positives(h: Tensor, y: Tensor) -> Tensor:
    """``TP_k`` for ``k = 0..n`` inspected, tied groups split in proportion (module docstring)."""
    n = h.numel()
    order = torch.argsort(-h, stable=True)
    hit = y[order].double()
    if n == 0:
        return hit.new_zeros(1)
    _, group, size = torch.unique_consecutive(h[order], return_inverse=True, return_counts=True)
    flipped = torch.zeros(size.numel(), dtype=torch.float64).index_add_(0, group, hit)
    start = size.cumsum(0) - size
    before = flipped.cumsum(0) - flipped
    k = torch.arange(1, n + 1, dtype=torch.float64)
    tp = before[group] + (k - start[group]) * flipped[group] / size[group]
    return torch.cat([hit.new_zeros(1), tp])


def detection_curve(
    scores: ArrayLike,
    flipped: ArrayLike,
    harmful_first: bool = True,
) -> dict[str, Tensor]:
    """``{"fraction", "recall" (=TPR), "fpr"}`` each ``[n + 1]`` (float64, CPU), ``k = 0..n``.

    ``fraction = k/n``, ``recall = TP_k/n₊``, ``fpr = (k − TP_k)/n₋`` (NaN when a class is
    empty); ties split in proportion (module docstring).
    """
    h, y = _labels(scores, flipped, harmful_first)
    tp = _true_positives(h, y)
    n, pos = y.numel(), float(y.sum())
    neg = n - pos
    fp = torch.arange(n + 1, dtype=torch.float64) - tp
    return {
        "fraction": torch.arange(n + 1, dtype=torch.float64) / max(n, 1),
        "recall": tp / pos if pos > 0 else torch.full_like(tp, float("nan")),
        "fpr": fp / neg if neg > 0 else torch.full_like(fp, float("nan")),
    }


def detection_auc(
    scores: ArrayLike,
    flipped: ArrayLike,
    harmful_first: bool = True,
) -> float:
    """ROC AUC by Mann-Whitney with average ranks: ``(Σ_{flipped} R_i − n₊(n₊+1)/2)/(n₊n₋)``.

    Ties count ½; NaN when either class is empty. Equals the trapezoid area under
    :func:`detection_curve`.
    """
    h, y = _labels(scores, flipped, harmful_first)
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(h, stable=True)
    _, group, size = torch.unique_consecutive(h[order], return_inverse=True, return_counts=True)
    end = size.cumsum(0).double()
    avg_rank = end - (size.double() - 1) / 2  # ranks start - 1 + 1 .. end, averaged
    ranks = torch.empty_like(h)
    ranks[order] = avg_rank[group]
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _k(k: int | float, n: int) -> int:
    """``k`` items (``0 < k < 1`` as a float: that fraction of ``n``), clamped to ``[0, n]``."""
    kk = int(round(k * n)) if isinstance(k, float) and k < 1 else int(k)
    return min(max(0, kk), n)


def recall_at_k(
    scores: ArrayLike,
    flipped: ArrayLike,
    k: int | float,
    harmful_first: bool = True,
) -> float:
    """``TP_k / n₊``: share of the flipped items among the first ``k`` inspected.

    ``k < 1`` (a float) is a fraction of ``n``; ``k > n`` reads as ``n``; NaN without flipped
    items. A tie at the cut counts in proportion (module docstring).
    """
    h, y = _labels(scores, flipped, harmful_first)
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    return float(_true_positives(h, y)[_k(k, y.numel())]) / pos


def precision_at_k(
    scores: ArrayLike,
    flipped: ArrayLike,
    k: int,
    harmful_first: bool = True,
) -> float:
    """``TP_k / k``: share of the first ``k`` inspected (at least 1, at most ``n``) that are
    flipped; NaN for no items."""
    h, y = _labels(scores, flipped, harmful_first)
    kk = _k(max(1, int(k)), y.numel())
    if kk == 0:
        return float("nan")
    return float(_true_positives(h, y)[kk]) / kk


def summary(scores: ArrayLike, flipped: ArrayLike, harmful_first: bool = True) -> dict[str, float]:
    """AUC and recall at 10/20/40 % inspected."""
    out = {"auc": detection_auc(scores, flipped, harmful_first)}
    for f in (0.1, 0.2, 0.4):
        out[f"recall@{int(100 * f)}%"] = recall_at_k(scores, flipped, f, harmful_first)
    return out
