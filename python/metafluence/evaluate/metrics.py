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
