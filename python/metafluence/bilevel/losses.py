"""Weighted set losses of math.md §1 and the logit curvature of a per-sample loss.

``L(θ; S, w) = Σ_j w_j ℓ(z_j; θ) / n`` — a weighted *mean* over the set (``n`` = set size).
The per-sample losses ``ℓ`` (``cross_entropy``, ``mse``) and ``resolve_loss`` (→ ``(fn, name)``)
live in :mod:`metafluence.psg.losses`, the lower layer, and are re-exported here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..psg.losses import LossFn, cross_entropy, mse
from ..psg.losses import resolve_named_loss as resolve_loss
from ._func import jvp

__all__ = [
    "PerSampleLoss",
    "cross_entropy",
    "logit_hessian_sqrt",
    "logit_hessian_vp",
    "mse",
    "resolve_loss",
    "weighted_mean",
]

PerSampleLoss = LossFn
"""A per-sample loss ``fn(logits, y) -> [N]`` (defined in :mod:`metafluence.psg.losses`)."""


def weighted_mean(per_sample: Tensor, weight: Tensor) -> Tensor:
    """``Σ_j w_j ℓ_j / n`` for ``per_sample [n]`` and ``weight [n]``."""
    return (per_sample * weight).sum() / per_sample.shape[0]


def logit_hessian_vp(fn: PerSampleLoss, logits: Tensor, y: Tensor, vec: Tensor) -> Tensor:
    """Per-sample ``∇²_logits ℓ_j · vec_j`` for logits/vec ``[N, C]`` → ``[N, C]``."""

    def total(lg: Tensor) -> Tensor:
        return fn(lg, y).sum()

    _, out = jvp(torch.func.grad(total), (logits,), (vec,))
    return out


def logit_hessian_sqrt(fn: PerSampleLoss, logits: Tensor, y: Tensor) -> Tensor:
    """``L_j`` with ``L_j L_jᵀ = ∇²_logits ℓ_j`` (eigen-factor, negative parts clamped).

    logits ``[N, C]`` → ``[N, C, C]``. The loss must not couple samples.
    """
    n, c = logits.shape[0], logits.reshape(logits.shape[0], -1).shape[1]
    eye = torch.eye(c, dtype=logits.dtype, device=logits.device)

    def col(e: Tensor) -> Tensor:
        return logit_hessian_vp(fn, logits, y, e.expand(n, c).reshape(logits.shape))

    hess = torch.func.vmap(col)(eye).reshape(c, n, c).permute(1, 2, 0)  # [N, C, C]
    hess = 0.5 * (hess + hess.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(hess)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(1)
