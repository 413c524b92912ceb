"""``psg_linear_dot``: per-sample dot products of a linear layer's weight gradients with ``m``
vectors, fused.

``out[n, j] = ⟨G_n, vectors[j]⟩_F = Σ_t grad_outputs[n, t]ᵀ vectors[j] activations[n, t]`` with
``G_n = Σ_t grad_outputs[n, t]ᵀ ⊗ activations[n, t]``; ``G`` (``[N, out, in]``) is never written
to memory: every kernel forms a tile of ``G_n`` in registers / a small buffer and reduces it
against the matching tile of each vector.

Backends (see :mod:`metafluence.ops._dispatch`): ``native`` (C++ on CPU, CUDA on GPU),
``triton`` and ``reference`` (:func:`metafluence.reference.psg_linear_dot`). All are
differentiable in all three inputs (the backward forms ``G``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _loader
from ..reference import psg_reduce as _reference
from . import _dispatch
from ._psg_reduce_common import dot_backward, validate_pair, validate_vectors

__all__ = ["psg_linear_dot"]

OP = "psg_linear_dot"
QUALNAME = f"metafluence::{OP}"
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# auto on CPU tries the reference first: at kronfluence's pairwise-score shapes
# (benchmarks/results/kronfluence.csv, 1 thread) the native CPU kernel took 12.5 ms against the
# reference's 1.5 ms (B=256, 256->10, Q=32) and 28.6 against 9.0 ms (B=8, T=128, 256->256, Q=8);
# it won only at 784->256, B=64 (159 against 249 ms). backend="native" still runs it.
CHECKS = _dispatch.register_op(
    OP,
    {
        "native": _dispatch.native_check(OP, DTYPES),
        "triton": _dispatch.triton_check(DTYPES),
        "reference": _dispatch.reference_check,
    },
    cpu_order=("reference", "native"),
)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    activations, grad_outputs, vectors = ctx.saved_tensors
    return dot_backward(grad, activations, grad_outputs, vectors)


def _register_native() -> bool:
    if not _loader.STATE.loaded or not hasattr(torch.ops.metafluence, OP):
        return False

    @torch.library.register_fake(QUALNAME)
    def _fake(
        activations: torch.Tensor, grad_outputs: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        torch._check(activations.dim() == 3, lambda: "activations must be [N, T, in]")
        torch._check(grad_outputs.dim() == 3, lambda: "grad_outputs must be [N, T, out]")
        torch._check(vectors.dim() == 3, lambda: "vectors must be [m, out, in]")
        torch._check(activations.shape[0] == grad_outputs.shape[0], lambda: "N must agree")
        torch._check(activations.shape[1] == grad_outputs.shape[1], lambda: "T must agree")
        torch._check(vectors.shape[1] == grad_outputs.shape[2], lambda: "out must agree")
        torch._check(vectors.shape[2] == activations.shape[2], lambda: "in must agree")
        torch._check(activations.dtype == grad_outputs.dtype, lambda: "dtypes must agree")
        torch._check(activations.dtype == vectors.dtype, lambda: "dtypes must agree")
        return activations.new_empty((activations.shape[0], vectors.shape[0]))

    torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)
    return True


NATIVE_REGISTERED = _register_native()


class _Triton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, activations: torch.Tensor, grad_outputs: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        from ..kernels.triton.psg_linear_reduce import psg_linear_dot as kernel

        ctx.save_for_backward(activations, grad_outputs, vectors)
        return kernel(activations, grad_outputs, vectors)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(ctx, grad)


def psg_linear_dot(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    vectors: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sample dot products of a linear layer's weight gradients with ``m`` vectors.

    ``out[n, j] = Σ_t grad_outputs[n, t]ᵀ vectors[j] activations[n, t]`` (``= ⟨G_n, v_j⟩``);
    ``[N, out, in]`` is never formed (forward).

    Args:
        activations: layer inputs ``[N, T, in]``.
        grad_outputs: per-sample loss gradients w.r.t. the layer outputs ``[N, T, out]``.
        vectors: ``[m, out, in]``, same dtype and device.
        backend: ``"native"``, ``"triton"``, ``"reference"`` (alias ``"torch"``) or ``None``.

    Returns:
        ``[N, m]`` in loss per unit weight times the units of ``vectors``.
    """
    validate_pair(OP, activations, grad_outputs)
    validate_vectors(OP, activations, grad_outputs, vectors)
    chosen = _dispatch.select_backend(
        OP, CHECKS, activations.device, activations.dtype, backend=backend
    )
    if chosen == "native":
        return torch.ops.metafluence.psg_linear_dot(
            activations.contiguous(), grad_outputs.contiguous(), vectors.contiguous()
        )
    if chosen == "triton":
        out = _Triton.apply(activations, grad_outputs, vectors)
        assert isinstance(out, torch.Tensor)
        return out
    return _reference.psg_linear_dot(activations, grad_outputs, vectors)
