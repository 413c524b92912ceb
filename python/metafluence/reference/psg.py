"""Reference (pure PyTorch) per-sample-gradient primitives: slow, obviously correct twins of the
fast ops in :mod:`metafluence.ops`, with the same signatures."""

from __future__ import annotations

import torch

__all__ = ["psg_linear"]


def psg_linear(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradient of a linear map ``y = x W^T``.

    ``out[n] = sum_t grad_outputs[n, t, :]^T (outer) activations[n, t, :]``, i.e.
    ``einsum('nto,nti->noi')``.

    Args:
        activations: layer inputs, ``[N, T, in]`` (``T`` = positions sharing the weight).
        grad_outputs: gradients of each sample's loss w.r.t. the layer outputs, ``[N, T, out]``.

    Returns:
        ``[N, out, in]``: the gradient of sample ``n``'s loss w.r.t. the weight, in the units of
        loss per unit weight.
    """
    return torch.einsum("nto,nti->noi", grad_outputs, activations)
