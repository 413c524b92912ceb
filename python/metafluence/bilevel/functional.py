"""The model as a pure function of a flat parameter vector."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import PerSampleLoss, weighted_mean
from .params import ParamSpec


@dataclass
class FunctionalModel:
    """``logits(Θ, x)`` with ``Θ [P]`` in :class:`ParamSpec` layout; set losses of math.md §1."""

    model: nn.Module
    spec: ParamSpec
    loss_fn: PerSampleLoss

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.model, self.spec.unflatten(theta), (x,))

    def logits_split(self, fixed: Tensor, adapted: Tensor, x: Tensor) -> Tensor:
        """``logits`` with the fixed and adapted blocks passed separately (see unflatten_split)."""
        params = self.spec.unflatten_split(fixed, adapted)
        return torch.func.functional_call(self.model, params, (x,))

    def set_loss_split(self, fixed: Tensor, adapted: Tensor, x: Tensor, y: Tensor, w: Tensor):
        """``L((fixed, adapted); S, w)``."""
        return weighted_mean(self.loss_fn(self.logits_split(fixed, adapted, x), y), w)

    def per_sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``ℓ(z_j; Θ)`` for ``x [n, ...]``, ``y [n]`` → ``[n]``."""
        return self.loss_fn(self.logits(theta, x), y)

    def set_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """``L(Θ; S, w) = Σ_j w_j ℓ(z_j; Θ) / n``."""
        return weighted_mean(self.per_sample_loss(theta, x, y), w)
