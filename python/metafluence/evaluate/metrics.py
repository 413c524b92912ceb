"""Agreement between predicted and actual effects."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor


def _flat(x: Tensor | Sequence[Tensor] | Sequence[float] | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().double().cpu().reshape(-1).numpy()
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor):
        return torch.cat([t.detach().double().cpu().reshape(-1) for t in x]).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def correlation(pred: Any, truth: Any) -> dict[str, float]:
    """``{"pearson", "spearman", "n", "rel_error"}`` between predictions and ground truth.

    ``rel_error = ‖pred − truth‖ / ‖truth‖``. Lists of per-task tensors are concatenated.
    Pearson / Spearman are NaN when ``n < 2`` or either side is constant. Empty or non-finite
    inputs raise ``ValueError`` naming ``pred`` / ``truth``.
    """
    p, t = _flat(pred), _flat(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} values but truth has {t.size}")
    if p.size == 0:
        raise ValueError("pred and truth are empty: nothing to correlate")
    for name, v in (("pred", p), ("truth", t)):
        bad = ~np.isfinite(v)
        if bad.any():
            raise ValueError(
                f"{name} has {int(bad.sum())} NaN/Inf values (first at index "
                f"{int(np.flatnonzero(bad)[0])})"
            )
    n = int(p.size)
    out: dict[str, float] = {"n": n}
    if n >= 2 and np.std(p) > 0 and np.std(t) > 0:
        out["pearson"] = float(stats.pearsonr(p, t)[0])
        out["spearman"] = float(stats.spearmanr(p, t)[0])
    else:
        out["pearson"] = float("nan")
        out["spearman"] = float("nan")
    denom = float(np.linalg.norm(t))
    out["rel_error"] = float(np.linalg.norm(p - t) / denom) if denom > 0 else float("nan")
    return out


def adapted_performance(problem: Any, meta_params: Any, tasks: Any) -> dict[str, float]:
    """Mean post-adaptation query loss and accuracy over ``tasks``: ``{"loss", "accuracy"}``.

    ``loss = (1/M) Σ_i L_O(θ_i(λ); Q_i)``; ``accuracy`` = correct query predictions of the
    adapted models ``θ_i`` over all query points. The adaptation runs on the problem's point
    (sharded over ranks when the problem has a multi-process reduction: ``task_losses`` and
    ``adapted`` come back gathered, ``[M]`` and ``[M, P]``); the query logits are then one
    forward batched over the ``M`` tasks on every rank.
    """
    from torch.func import vmap

    pt = problem.point(meta_params, tasks)
    with torch.no_grad():
        losses = pt.task_losses()
        thetas = pt.adapted()
        b = problem.batch(tasks, pt.lam)
        if b.num_tasks == 0:
            return {"loss": float("nan"), "accuracy": float("nan")}
        logits = vmap(problem.fm.logits)(thetas, b.xq)  # [M, m, classes]
        correct = (logits.argmax(-1) == b.yq).sum()
    return {"loss": float(losses.mean()), "accuracy": int(correct) / max(1, b.yq.numel())}
