"""Linear datamodeling score (LDS), as dattri defines it, in metafluence's sign convention.

dattri (``dattri.metric.lds``): for each random subset ``S_s`` the prediction is
``Σ_{i∈S_s} score[i, j]`` and ``LDS_j`` is the Spearman correlation, across subsets, between
the predictions and the ground-truth values ``gt[s, j]``; callers average over ``j``.

Signs. Our score is the removal effect ``Δf_{-e}`` (positive: removing ``e`` raises the target
loss). For a *removed* subset ``R`` the first-order prediction of ``f(λ*_{-R}) − f(λ*)`` is
``+Σ_{e∈R} score_e``. dattri's subsets are the *kept* halves ``K`` (models trained on ``K``);
since ``R`` is the complement of ``K``, ``Σ_R score = Σ_all score − Σ_K score``, so the
prediction for a kept subset is ``−Σ_{e∈K} score_e`` up to a constant, which Spearman ignores.
``subsets="removed"`` (default) or ``"kept"`` selects which the masks / indices describe;
``gt`` is always the target value (or its change) of the model retrained on the kept items.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor


def random_subsets(n: int, num_subsets: int = 100, ratio: float = 0.5, seed: int = 0) -> Tensor:
    """``[num_subsets, round(ratio·n)]`` sorted index rows, each a seeded random subset."""
    g = torch.Generator().manual_seed(int(seed))
    size = max(1, int(round(ratio * n)))
    return torch.stack(
        [torch.randperm(n, generator=g)[:size].sort().values for _ in range(int(num_subsets))]
    )


def subset_masks(indices: Tensor, n: int) -> Tensor:
    """Index rows ``[S, k]`` → bool masks ``[S, n]``."""
    m = torch.zeros(indices.shape[0], n, dtype=torch.bool)
    m.scatter_(1, indices.long(), True)
    return m


def complement(indices: Tensor, n: int) -> list[list[int]]:
    """The items *not* in each subset (as lists)."""
    m = subset_masks(indices, n)
    return [torch.nonzero(~row).flatten().tolist() for row in m]


def lds_predictions(scores: Tensor, indices: Tensor, subsets: str = "removed") -> Tensor:
    """Predicted ``Δf`` for each subset: ``[S, n_test]`` (``scores`` ``[n]`` or ``[n, n_test]``)."""
    if subsets not in ("removed", "kept"):
        raise ValueError(f"subsets={subsets!r}: expected 'removed' or 'kept'")
    s = scores.detach().double()
    s = s.unsqueeze(-1) if s.dim() == 1 else s
    masks = subset_masks(indices, s.shape[0]).double()
    pred = masks @ s
    return pred if subsets == "removed" else -pred


def lds(scores: Tensor, gt: Tensor, indices: Tensor, subsets: str = "removed") -> dict[str, Any]:
    """LDS: mean over test targets of the Spearman ρ across subsets.

    Args:
        scores: removal effects ``[n_train]`` or ``[n_train, n_test]``.
        gt: ``[n_subsets]`` or ``[n_subsets, n_test]``: the true target change (or value)
            after retraining without the removed items of each subset.
        indices: ``[n_subsets, k]`` item positions of each subset.
        subsets: whether ``indices`` lists the removed (default) or the kept items.

    Returns ``{"lds": mean ρ, "per_target": [ρ_j], "n_subsets": S}``.
    """
    pred = lds_predictions(scores, indices, subsets).numpy()
    t = gt.detach().double().cpu().numpy()
    t = t[:, None] if t.ndim == 1 else t
    if t.shape != pred.shape:
        raise ValueError(f"gt has shape {t.shape}, predictions {pred.shape}")
    rhos = []
    for j in range(t.shape[1]):
        if np.std(pred[:, j]) > 0 and np.std(t[:, j]) > 0:
            rhos.append(float(stats.spearmanr(pred[:, j], t[:, j])[0]))
        else:
            rhos.append(float("nan"))
    return {
        "lds": float(np.nanmean(rhos)) if rhos else float("nan"),
        "per_target": rhos,
        "n_subsets": int(t.shape[0]),
    }
