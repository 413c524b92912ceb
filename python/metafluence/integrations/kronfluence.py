"""kronfluence's per-module hot spots on metafluence's per-sample-gradient kernels.

kronfluence (``TrackedLinear``) computes, for a linear layer with input activations
``a [B, ..., in]`` and output gradients ``g [B, ..., out]`` (``...`` = tokens, any number of
dims):

* per-sample gradients ``G_b = Σ_t g_btᵀ a_bt``: ``[B, out, in]`` (``"b...i,b...o->bio"``);
* pairwise scores ``⟨P_q, G_b⟩``: ``[Q, B]`` for preconditioned query gradients ``P``
  ``[Q, out, in]``
  or a low-rank pair ``(L [Q, out, r], R [Q, r, in])``;
* self scores ``⟨P_b, G_b⟩``: ``[B]``.

The functions here take and return kronfluence's shapes and run on
:func:`metafluence.ops.psg_linear` / :func:`~metafluence.ops.psg_linear_dot` (native C++ / CUDA /
Triton kernels; pairwise scores never form ``[B, out, in]``). :func:`use_metafluence_kernels`
swaps them into kronfluence's ``TrackedLinear`` for the duration of a ``with`` block (per-token
scores, and dtypes other than float32 / float64, keep kronfluence's own code).

Bias: kronfluence appends a column of ones to ``a`` when the layer has a bias; these functions
take ``a`` as given (pass the augmented activations), and the patched methods augment it exactly
as kronfluence does.

This module does not import kronfluence (only :func:`use_metafluence_kernels` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .. import ops

__all__ = ["pairwise_score", "per_sample_gradient", "self_score", "use_metafluence_kernels"]

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


@contextlib.contextmanager
def use_metafluence_kernels() -> Iterator[None]:
    """Within the block, kronfluence's ``TrackedLinear`` computes per-sample gradients, pairwise
    and self scores with metafluence's kernels (originals restored on exit)."""
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

    patched = {
        "compute_per_sample_gradient": compute_per_sample_gradient,
        "compute_pairwise_score": compute_pairwise_score,
        "compute_self_measurement_score": compute_self_measurement_score,
    }
    try:
        for name, fn in patched.items():
            setattr(TrackedLinear, name, fn)
        yield
    finally:
        for name, fn in orig.items():
            setattr(TrackedLinear, name, fn)
