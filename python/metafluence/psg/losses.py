"""Per-sample losses ``ℓ(z_j; θ)``: the one home of ``"cross_entropy" | "mse" | callable``.

``psg`` is the lowest layer that needs a loss, so the definitions live here and
:mod:`metafluence.bilevel.losses` imports them (math.md §1):

- ``cross_entropy``: ``ℓ_j = −log softmax(logits_j)[y_j]``, logits ``[N, C]``, y ``[N]`` int;
- ``mse``: ``ℓ_j = ‖pred_j − y_j‖²`` summed over output dims, pred ``[N, ...]``.

Both return ``[N]`` (no reduction over samples).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossFn", "LossSpec", "cross_entropy", "mse", "resolve_loss", "resolve_named_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""A per-sample loss ``fn(logits, y) -> [N]``."""
LossSpec = str | LossFn
"""``"cross_entropy"`` (alias ``"ce"``), ``"mse"`` (alias ``"squared"``) or a :data:`LossFn`."""


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """``ℓ_j = −log softmax(logits_j)[y_j]``; logits ``[N, C]``, y ``[N]`` int → ``[N]``."""
    return F.cross_entropy(logits, y, reduction="none")


def mse(pred: Tensor, y: Tensor) -> Tensor:
    """``ℓ_j = ‖pred_j − y_j‖²`` summed over output dims; pred ``[N, ...]`` → ``[N]``.

    A trailing output dim of size 1 is squeezed when ``y`` has one dim less (``[N, 1]`` vs
    ``[N]``), so a scalar regression head needs no reshaping.
    """
    if pred.dim() == y.dim() + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    diff = (pred - y.to(pred.dtype)).reshape(pred.shape[0], -1)
    return (diff * diff).sum(-1)


_NAMED: dict[str, tuple[LossFn, str]] = {
    "cross_entropy": (cross_entropy, "cross_entropy"),
    "ce": (cross_entropy, "cross_entropy"),
    "mse": (mse, "mse"),
    "squared": (mse, "mse"),
}


def resolve_named_loss(loss: LossSpec) -> tuple[LossFn, str]:
    """Map ``"cross_entropy" | "ce" | "mse" | "squared" | callable`` to ``(fn, name)``.

    A callable is returned as is, named by its ``__name__`` (``"custom"`` without one).
    """
    if callable(loss):
        return loss, getattr(loss, "__name__", "custom")
    if isinstance(loss, str) and loss in _NAMED:
        return _NAMED[loss]
    raise ValueError(f"loss={loss!r}: expected 'cross_entropy', 'mse' or a callable(logits, y)")


def resolve_loss(loss: LossSpec) -> LossFn:
    """The per-sample loss ``fn(logits, y) -> [N]`` of :func:`resolve_named_loss`."""
    return resolve_named_loss(loss)[0]
