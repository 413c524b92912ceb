"""Reference (pure PyTorch) per-sample-gradient primitives: slow, obviously correct twins of the
fast ops in :mod:`metafluence.ops`, with the same signatures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psg_conv2d", "psg_linear"]

Pair = tuple[int, int]


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


def psg_conv2d(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    kernel_size: Pair,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample weight gradient of a 2-D convolution (zero padding), via ``F.unfold``.

    ``out[n, o, c, i, j] = Σ_{y,x} grad_outputs[n, o, y, x] ·
    activations[n, g·C/groups + c, y·sh + i·dh − ph, x·sw + j·dw − pw]`` with ``g`` the group of
    ``o`` and out-of-range input positions read as 0; per group this is
    ``g_n [O/groups, T] @ unfold(x_n)ᵀ [T, C/groups·kh·kw]``.

    Args:
        activations: layer inputs ``[N, C, H, W]``.
        grad_outputs: gradients of each sample's loss w.r.t. the layer outputs
            ``[N, O, Ho, Wo]``.
        kernel_size, stride, padding, dilation: ``(h, w)`` pairs as in ``nn.Conv2d``.
        groups: as in ``nn.Conv2d`` (divides ``C`` and ``O``).

    Returns:
        ``[N, O, C/groups, kh, kw]`` in loss per unit weight.
    """
    n, c = activations.shape[:2]
    o, ho, wo = grad_outputs.shape[1:]
    kh, kw = kernel_size
    if n == 0 or c == 0 or ho * wo == 0:  # nothing to unfold (F.unfold rejects these)
        return activations.new_zeros(n, o, c // groups, kh, kw)
    u = F.unfold(activations, kernel_size, dilation=dilation, padding=padding, stride=stride)
    u = u.reshape(n, groups, (c // groups) * kh * kw, ho * wo)
    g = grad_outputs.reshape(n, groups, o // groups, ho * wo)
    return torch.einsum("ngot,ngkt->ngok", g, u).reshape(n, o, c // groups, kh, kw)
