"""Per-sample losses accepted by :mod:`metafluence.psg` (``"cross_entropy" | "mse" | callable``).

Same definitions as :mod:`metafluence.bilevel.losses` (kept here so that ``psg``, a lower layer,
does not import ``bilevel``): ``cross_entropy``: ``ℓ_n = −log softmax(logits_n)[y_n]``;
``mse``: ``ℓ_n = ‖pred_n − y_n‖²`` summed over output dims.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossSpec = str | LossFn


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if pred.dim() == y.dim() + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    diff = (pred - y.to(pred.dtype)).reshape(pred.shape[0], -1)
    return (diff * diff).sum(-1)


def resolve_loss(loss: LossSpec) -> LossFn:
    """``"cross_entropy"`` (alias ``"ce"``), ``"mse"`` or ``callable(logits, y) -> [N]``."""
    if callable(loss):
        return loss
    if loss in ("cross_entropy", "ce"):
        return _cross_entropy
    if loss in ("mse", "squared"):
        return _mse
    raise ValueError(f"loss={loss!r}: expected 'cross_entropy', 'mse' or a callable(logits, y)")
