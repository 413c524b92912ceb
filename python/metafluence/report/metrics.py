"""The report's names for the detection metrics: thin wrappers of the evaluate ones.

The report speaks of ``harm`` (larger = more suspicious, e.g. ``−removal_effect``) and a boolean
``positive`` mask; each function is the evaluate one with ``harmful_first=False``, so the job and
the library compute the same numbers (ties: average ranks, Mann-Whitney; see that module).
"""

from __future__ import annotations

import numpy as np

from ..evaluate import detection as _detection
from ..evaluate.detection import ArrayLike

__all__ = ["recall_at_k", "recall_curve", "roc_auc", "roc_curve"]


def roc_auc(harm: ArrayLike, positive: ArrayLike) -> float:
    """``P(h₊ > h₋) + ½ P(h₊ = h₋)`` (Mann-Whitney); NaN when one class is empty."""
    return _detection.detection_auc(harm, positive, harmful_first=False)


def roc_curve(harm: ArrayLike, positive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rate, true positive rate)`` for ``k = 0..n`` items, highest harm first."""
    c = _detection.detection_curve(harm, positive, harmful_first=False)
    return c["fpr"].numpy(), c["recall"].numpy()


def recall_at_k(harm: ArrayLike, positive: ArrayLike, k: int) -> float:
    """``TP_k / n₊``: share of the positives among the ``k`` highest-harm items."""
    return _detection.recall_at_k(harm, positive, int(k), harmful_first=False)


def recall_curve(harm: ArrayLike, positive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(fraction inspected, recall)`` when inspecting items from most harmful down."""
    c = _detection.detection_curve(harm, positive, harmful_first=False)
    return c["fraction"].numpy(), c["recall"].numpy()
