"""kronfluence's per-module hot spots on metafluence's per-sample-gradient kernels.

kronfluence (``TrackedLinear``) computes, for a linear layer with input activations
``a [B, ..., in]`` and output gradients ``g [B, ..., out]`` (``...`` = tokens, any number of
dims):

* per-sample gradients ``G_b = Σ_t g_btᵀ a_bt``: ``[B, out, in]`` (``"b...i,b...o->bio"``);
* pairwise scores ``⟨P_q, G_b⟩``: ``[Q, B]`` for preconditioned query gradients ``P``
  ``[Q, out, in]``
  or a low-rank pair ``(L [Q, out, r], R [Q, r, in])``;
* self scores ``⟨P_b, G_b⟩``: ``[B]``.

``TrackedConv2d`` does the same with ``in = C·kh·kw`` (the unfolded input, which kronfluence forms
with ``F.unfold``) and ``t`` the output positions.

The functions here take and return kronfluence's shapes and run on
:func:`metafluence.ops.psg_linear` / :func:`~metafluence.ops.psg_linear_dot` and, for
convolutions, :func:`metafluence.ops.psg_conv2d` / :func:`~metafluence.ops.psg_conv2d_dot`
(native C++ / CUDA / Triton kernels; pairwise scores never form ``[B, out, in]``, and the conv
functions never form the unfolded input). :func:`use_metafluence_kernels` swaps them into
kronfluence's ``TrackedLinear`` and ``TrackedConv2d`` for the duration of a ``with`` block
(per-token scores, dtypes other than float32 / float64, and convolutions with ``groups > 1`` or a
padding mode other than zeros -- which kronfluence treats its own way -- keep kronfluence's own
code).

Bias: kronfluence appends a column of ones to ``a`` when the layer has a bias; these functions
take ``a`` as given (pass the augmented activations), and the patched methods augment it exactly
as kronfluence does.

This module does not import kronfluence (only :func:`use_metafluence_kernels` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import ops
from ..psg.rules import conv2d_geometry

__all__ = [
    "conv2d_pairwise_score",
    "conv2d_per_sample_gradient",
    "conv2d_self_score",
    "pairwise_score",
    "per_sample_gradient",
    "self_score",
    "use_metafluence_kernels",
]

_DTYPES = (torch.float32, torch.float64)


def _ntd(x: Tensor) -> Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` (``T`` = product of the middle dims, 1 if none)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def per_sample_gradient(input_activation: Tensor, output_gradient: Tensor) -> Tensor:
    """``[B, out, in]`` per-sample weight gradients (kronfluence's ``"b...i,b...o->bio"``)."""
    return ops.psg_linear(_ntd(input_activation), _ntd(output_gradient))


def pairwise_score(
    preconditioned_gradient: Tensor | list[Tensor] | tuple[Tensor, Tensor],
    input_activation: Tensor,
    output_gradient: Tensor,
) -> Tensor:
    """``[Q, B]`` scores ``⟨P_q, G_b⟩`` without forming ``G`` (kronfluence's
    ``"qio,b...i,b...o->qb"``, or ``"qik,qko,b...i,b...o->qb"`` for a low-rank ``[L, R]``)."""
    if isinstance(preconditioned_gradient, (list, tuple)):
        left, right = preconditioned_gradient
        pg = torch.bmm(left, right)
    else:
        pg = preconditioned_gradient
    a, g = _ntd(input_activation), _ntd(output_gradient)
    return ops.psg_linear_dot(a, g, pg.to(a.dtype)).T


def self_score(
    preconditioned_gradient: Tensor, input_activation: Tensor, output_gradient: Tensor
) -> Tensor:
    """``[B]`` scores ``⟨P_b, G_b⟩`` (kronfluence's ``"bio,b...i,b...o->b"``)."""
    G = per_sample_gradient(input_activation, output_gradient)
    return (preconditioned_gradient.to(G.dtype) * G).sum(dim=(1, 2))


def _low_rank(pg: Tensor | list[Tensor] | tuple[Tensor, Tensor]) -> Tensor:
    if isinstance(pg, (list, tuple)):
        left, right = pg
        return torch.bmm(left, right)
    return pg


def conv2d_per_sample_gradient(
    module: nn.Conv2d, input_activation: Tensor, output_gradient: Tensor
) -> Tensor:
    """``[B, O, C·kh·kw (+1)]`` per-sample gradients of ``module`` in kronfluence's layout (the
    last column is the bias gradient ``Σ_t g`` when the module has a bias), for inputs
    ``[B, C, H, W]`` and output gradients ``[B, O, Ho, Wo]`` (:func:`metafluence.ops.psg_conv2d`).
    """
    x, geom = conv2d_geometry(module, input_activation)
    g = output_gradient.to(x.dtype)
    G = ops.psg_conv2d(x, g, *geom).flatten(2)
    if module.bias is not None:
        G = torch.cat([G, g.sum((2, 3)).unsqueeze(-1)], dim=-1)
    return G


def conv2d_pairwise_score(
    module: nn.Conv2d,
    preconditioned_gradient: Tensor | list[Tensor] | tuple[Tensor, Tensor],
    input_activation: Tensor,
    output_gradient: Tensor,
) -> Tensor:
    """``[Q, B]`` scores ``⟨P_q, G_b⟩`` for ``P`` ``[Q, O, C·kh·kw (+1)]`` (or a low-rank pair)
    without forming ``G`` or the unfolded input (:func:`metafluence.ops.psg_conv2d_dot`)."""
    x, geom = conv2d_geometry(module, input_activation)
    g = output_gradient.to(x.dtype)
    pg = _low_rank(preconditioned_gradient).to(x.dtype)
    k = x.shape[1] // module.groups * module.kernel_size[0] * module.kernel_size[1]
    pw = pg[..., :k].reshape(pg.shape[0], pg.shape[1], -1, *module.kernel_size)
    scores = ops.psg_conv2d_dot(x, g, pw.contiguous(), *geom)
    if module.bias is not None:
        scores = scores + g.sum((2, 3)) @ pg[..., k].T
    return scores.T


def conv2d_self_score(
    module: nn.Conv2d,
    preconditioned_gradient: Tensor,
    input_activation: Tensor,
    output_gradient: Tensor,
) -> Tensor:
    """``[B]`` scores ``⟨P_b, G_b⟩`` for ``P`` ``[B, O, C·kh·kw (+1)]``."""
    G = conv2d_per_sample_gradient(module, input_activation, output_gradient)
    return (preconditioned_gradient.to(G.dtype) * G).sum(dim=(1, 2))


@contextlib.contextmanager
def use_metafluence_kernels() -> Iterator[None]:
    """Within the block, kronfluence's ``TrackedLinear`` and ``TrackedConv2d`` compute per-sample
    gradients, pairwise and self scores with metafluence's kernels (originals restored on exit).
    """
    from kronfluence.module.conv2d import TrackedConv2d
    from kronfluence.module.linear import TrackedLinear

    orig = {
        name: getattr(TrackedLinear, name)
        for name in (
            "compute_per_sample_gradient",
            "compute_pairwise_score",
            "compute_self_measurement_score",
        )
    }

    def _ok(self, a: Tensor, g: Tensor) -> bool:
        return a.dtype in _DTYPES and g.dtype == a.dtype

    def compute_per_sample_gradient(self, input_activation, output_gradient):
        if not _ok(self, input_activation, output_gradient):
            return orig["compute_per_sample_gradient"](self, input_activation, output_gradient)
        a = self._flatten_input_activation(input_activation=input_activation)
        out = per_sample_gradient(a, output_gradient)
        if self.per_sample_gradient_process_fnc is not None:
            out = self.per_sample_gradient_process_fnc(module_name=self.name, gradient=out)
        return out

    def compute_pairwise_score(self, preconditioned_gradient, input_activation, output_gradient):
        per_token = self.score_args.compute_per_token_scores and input_activation.dim() == 3
        if per_token or not _ok(self, input_activation, output_gradient):
            return orig["compute_pairwise_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        a = self._flatten_input_activation(input_activation=input_activation)
        return pairwise_score(preconditioned_gradient, a, output_gradient)

    def compute_self_measurement_score(
        self, preconditioned_gradient, input_activation, output_gradient
    ):
        if not _ok(self, input_activation, output_gradient):
            return orig["compute_self_measurement_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        a = self._flatten_input_activation(input_activation=input_activation)
        return self_score(preconditioned_gradient, a, output_gradient)

    conv_orig = {name: getattr(TrackedConv2d, name) for name in orig}

    def _conv_ok(self, a: Tensor, g: Tensor) -> bool:
        m = self.original_module
        return _ok(self, a, g) and m.groups == 1 and m.padding_mode == "zeros"

    def conv_per_sample_gradient(self, input_activation, output_gradient):
        if not _conv_ok(self, input_activation, output_gradient):
            return conv_orig["compute_per_sample_gradient"](self, input_activation, output_gradient)
        out = conv2d_per_sample_gradient(self.original_module, input_activation, output_gradient)
        if self.per_sample_gradient_process_fnc is not None:
            out = self.per_sample_gradient_process_fnc(module_name=self.name, gradient=out)
        return out

    def conv_pairwise_score(self, preconditioned_gradient, input_activation, output_gradient):
        if not _conv_ok(self, input_activation, output_gradient):
            return conv_orig["compute_pairwise_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        return conv2d_pairwise_score(
            self.original_module, preconditioned_gradient, input_activation, output_gradient
        )

    def conv_self_score(self, preconditioned_gradient, input_activation, output_gradient):
        if not _conv_ok(self, input_activation, output_gradient):
            return conv_orig["compute_self_measurement_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        return conv2d_self_score(
            self.original_module, preconditioned_gradient, input_activation, output_gradient
        )

    patches = {
        TrackedLinear: (
            orig,
            (compute_per_sample_gradient, compute_pairwise_score, compute_self_measurement_score),
        ),
        TrackedConv2d: (
            conv_orig,
            (conv_per_sample_gradient, conv_pairwise_score, conv_self_score),
        ),
    }
    try:
        for cls, (names, fns) in patches.items():
            for name, fn in zip(names, fns, strict=True):
                setattr(cls, name, fn)
        yield
    finally:
        for cls, (names, _) in patches.items():
            for name, fn in names.items():
                setattr(cls, name, fn)
