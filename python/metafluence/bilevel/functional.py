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

    def per_sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``ℓ(z_j; Θ)`` for ``x [n, ...]``, ``y [n]`` → ``[n]``."""
        return self.loss_fn(self.logits(theta, x), y)

    def set_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """``L(Θ; S, w) = Σ_j w_j ℓ(z_j; Θ) / n``."""
        return weighted_mean(self.per_sample_loss(theta, x, y), w)
