"""Detection of flipped (mislabelled) items from scores: curve, AUC, recall@k (no sklearn).

Signs: a removal effect is *negative* for a harmful item (removing it lowers the target loss),
so items are inspected from the most negative score up (``harmful_first=True``, the default).
Pass ``harmful_first=False`` for scores where larger means more suspicious (e.g. a loss).

As in dattri's ``mislabel_detection_auc``: rank the items, sweep the number inspected
``k = 0..n``, record TPR (recall of flipped items) and FPR, and integrate TPR over FPR with the
trapezoid rule. Ties in the scores are broken by position (stable sort), as dattri does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _flat(x: Tensor | Sequence[Tensor]) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().reshape(-1)
    return torch.cat([t.detach().reshape(-1) for t in x])


def inspection_order(scores: Tensor | Sequence[Tensor], harmful_first: bool = True) -> Tensor:
    """Positions (flattened) in the order an inspector would look at them."""
    s = _flat(scores).double()
    return torch.argsort(s if harmful_first else -s, stable=True)


def detection_curve(
    scores: Tensor | Sequence[Tensor],
    flipped: Tensor | Sequence[Tensor],
    harmful_first: bool = True,
) -> dict[str, Tensor]:
    """``{"fraction", "recall" (=TPR), "fpr"}`` each ``[n + 1]`` for ``k = 0..n`` inspected."""
    y = _flat(flipped).bool()
    order = inspection_order(scores, harmful_first)
    if order.numel() != y.numel():
        raise ValueError(f"{order.numel()} scores but {y.numel()} flipped flags")
    hit = y[order].double()
    n, pos = y.numel(), float(y.sum())
    neg = n - pos
    tp = torch.cat([hit.new_zeros(1), hit.cumsum(0)])
    fp = torch.cat([hit.new_zeros(1), (1 - hit).cumsum(0)])
    return {
        "fraction": torch.arange(n + 1, dtype=torch.float64) / max(n, 1),
        "recall": tp / pos if pos > 0 else torch.full_like(tp, float("nan")),
        "fpr": fp / neg if neg > 0 else torch.full_like(fp, float("nan")),
    }


def detection_auc(
    scores: Tensor | Sequence[Tensor],
    flipped: Tensor | Sequence[Tensor],
    harmful_first: bool = True,
) -> float:
    """ROC AUC of the ranking (trapezoid rule over the (FPR, TPR) points of k = 0..n)."""
    c = detection_curve(scores, flipped, harmful_first)
    return float(torch.trapezoid(c["recall"], c["fpr"]))


def recall_at_k(
    scores: Tensor | Sequence[Tensor],
    flipped: Tensor | Sequence[Tensor],
    k: int | float,
    harmful_first: bool = True,
) -> float:
    """Fraction of flipped items among the first ``k`` inspected (``k < 1``: a fraction of n)."""
    y = _flat(flipped).bool()
    n = y.numel()
    kk = int(round(k * n)) if isinstance(k, float) and k < 1 else int(k)
    order = inspection_order(scores, harmful_first)[: max(0, kk)]
    pos = int(y.sum())
    return float(y[order].sum()) / pos if pos > 0 else float("nan")


def precision_at_k(
    scores: Tensor | Sequence[Tensor],
    flipped: Tensor | Sequence[Tensor],
    k: int,
    harmful_first: bool = True,
) -> float:
    """Fraction of the first ``k`` inspected that are flipped."""
    y = _flat(flipped).bool()
    order = inspection_order(scores, harmful_first)[: max(1, int(k))]
    return float(y[order].double().mean())


def summary(scores: Any, flipped: Any, harmful_first: bool = True) -> dict[str, float]:
    """AUC and recall at 10/20/40 % inspected."""
    out = {"auc": detection_auc(scores, flipped, harmful_first)}
    for f in (0.1, 0.2, 0.4):
        out[f"recall@{int(100 * f)}%"] = recall_at_k(scores, flipped, f, harmful_first)
    return out
