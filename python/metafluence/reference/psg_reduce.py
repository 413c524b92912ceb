"""Reference twins of the fused per-sample-gradient reductions (``psg_linear_sqnorm``,
``psg_linear_dot``, ``psg_conv2d_sqnorm``, ``psg_conv2d_dot``): they form the per-sample gradient
explicitly, then reduce it."""

from __future__ import annotations

import torch

from .psg import Pair, psg_conv2d, psg_linear

__all__ = ["psg_conv2d_dot", "psg_conv2d_sqnorm", "psg_linear_dot", "psg_linear_sqnorm"]


def psg_linear_sqnorm(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Frobenius norm of the weight gradient of a linear map.

    ``out[n] = ‖G_n‖²_F`` with ``G_n = Σ_t grad_outputs[n, t]ᵀ ⊗ activations[n, t]``
    (:func:`metafluence.reference.psg_linear`).

    Args:
        activations: ``[N, T, in]``; grad_outputs: ``[N, T, out]``.

    Returns:
        ``[N]`` in (loss per unit weight)².
    """
    g = psg_linear(activations, grad_outputs)
    return g.pow(2).sum(dim=(1, 2))


def psg_linear_dot(
    activations: torch.Tensor, grad_outputs: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """Per-sample dot products of the weight gradient of a linear map with ``m`` vectors.

    ``out[n, j] = ⟨G_n, vectors[j]⟩_F = Σ_t grad_outputs[n, t]ᵀ vectors[j] activations[n, t]``.

    Args:
        activations: ``[N, T, in]``; grad_outputs: ``[N, T, out]``; vectors: ``[m, out, in]``.

    Returns:
        ``[N, m]``.
    """
    g = psg_linear(activations, grad_outputs)
    return torch.einsum("noi,moi->nm", g, vectors)


def psg_conv2d_sqnorm(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    kernel_size: Pair,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample squared Frobenius norm ``out[n] = ‖G_n‖²_F`` of the weight gradient ``G_n`` of
    a 2-D convolution (:func:`metafluence.reference.psg_conv2d`, same arguments).

    Returns:
        ``[N]`` in (loss per unit weight)².
    """
    g = psg_conv2d(activations, grad_outputs, kernel_size, stride, padding, dilation, groups)
    return g.pow(2).sum(dim=(1, 2, 3, 4))


def psg_conv2d_dot(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    vectors: torch.Tensor,
    kernel_size: Pair,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample dot products ``out[n, j] = ⟨G_n, vectors[j]⟩_F`` of the weight gradient of a
    2-D convolution with ``m`` vectors ``[m, O, C/groups, kh, kw]``.

    Returns:
        ``[N, m]``.
    """
    g = psg_conv2d(activations, grad_outputs, kernel_size, stride, padding, dilation, groups)
    return g.flatten(1) @ vectors.flatten(1).T
