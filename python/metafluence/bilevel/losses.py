"""Per-sample losses ``ℓ(z; θ)`` and the weighted set losses of math.md §1.

``L(θ; S, w) = Σ_j w_j ℓ(z_j; θ) / n`` — a weighted *mean* over the set (``n`` = set size).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._func import jvp

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """``ℓ_j = −log softmax(logits_j)[y_j]``; logits ``[N, C]``, y ``[N]`` int → ``[N]``."""
    return F.cross_entropy(logits, y, reduction="none")


def mse(pred: Tensor, y: Tensor) -> Tensor:
    """``ℓ_j = ‖pred_j − y_j‖²`` summed over output dims; pred ``[N, ...]`` → ``[N]``."""
    if pred.dim() == y.dim() + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    diff = (pred - y.to(pred.dtype)).reshape(pred.shape[0], -1)
    return (diff * diff).sum(-1)


def resolve_loss(loss: str | PerSampleLoss) -> tuple[PerSampleLoss, str]:
    """Map ``"cross_entropy" | "mse" | callable`` to ``(fn, name)``."""
    if callable(loss):
        return loss, getattr(loss, "__name__", "custom")
    if loss in ("cross_entropy", "ce"):
        return cross_entropy, "cross_entropy"
    if loss in ("mse", "squared"):
        return mse, "mse"
    raise ValueError(f"loss={loss!r}: expected 'cross_entropy', 'mse' or a callable(logits, y)")


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
