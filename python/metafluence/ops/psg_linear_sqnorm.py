"""``psg_linear_sqnorm``: per-sample squared norms of a linear layer's weight gradients, fused.

``out[n] = ‖G_n‖²_F`` with ``G_n = Σ_t grad_outputs[n, t]ᵀ ⊗ activations[n, t]`` (``[out, in]``),
without ever writing ``G`` (``[N, out, in]``) to memory. The C++ kernel uses the Gram ("ghost")
form ``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` when it needs fewer flops than the row-tiled product;
the CUDA and Triton kernels use the tiled product.

Backends (see :mod:`metafluence.ops._dispatch`): ``native`` (C++ on CPU, CUDA on GPU),
``triton`` and ``reference`` (:func:`metafluence.reference.psg_linear_sqnorm`). All are
differentiable (the backward forms ``G``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _loader
from ..reference import psg_reduce as _reference
from . import _dispatch
from ._psg_reduce_common import sqnorm_backward, validate_pair

__all__ = ["psg_linear_sqnorm"]

OP = "psg_linear_sqnorm"
QUALNAME = f"metafluence::{OP}"
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

CHECKS = _dispatch.register_op(
    OP,
    {
        "native": _dispatch.native_check(OP, DTYPES),
        "triton": _dispatch.triton_check(DTYPES),
        "reference": _dispatch.reference_check,
    },
)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    activations, grad_outputs = ctx.saved_tensors
    return sqnorm_backward(grad, activations, grad_outputs)


def _register_native() -> bool:
    if not _loader.STATE.loaded or not hasattr(torch.ops.metafluence, OP):
        return False

    @torch.library.register_fake(QUALNAME)
    def _fake(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        torch._check(activations.dim() == 3, lambda: "activations must be [N, T, in]")
        torch._check(grad_outputs.dim() == 3, lambda: "grad_outputs must be [N, T, out]")
        torch._check(activations.shape[0] == grad_outputs.shape[0], lambda: "N must agree")
        torch._check(activations.shape[1] == grad_outputs.shape[1], lambda: "T must agree")
        torch._check(activations.dtype == grad_outputs.dtype, lambda: "dtypes must agree")
        return activations.new_empty((activations.shape[0],))

    torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)
    return True


NATIVE_REGISTERED = _register_native()


class _Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        from ..kernels.triton.psg_linear_reduce import psg_linear_sqnorm as kernel

        ctx.save_for_backward(activations, grad_outputs)
        return kernel(activations, grad_outputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _backward(ctx, grad)


def psg_linear_sqnorm(
    activations: torch.Tensor, grad_outputs: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Per-sample squared Frobenius norms of a linear layer's weight gradients.

    ``out[n] = ‖Σ_t grad_outputs[n, t]ᵀ ⊗ activations[n, t]‖²_F``; ``[N, out, in]`` is never
    formed (forward).

    Args:
        activations: layer inputs ``[N, T, in]``.
        grad_outputs: per-sample loss gradients w.r.t. the layer outputs ``[N, T, out]``.
        backend: ``"native"``, ``"triton"``, ``"reference"`` (alias ``"torch"``) or ``None``.

    Returns:
        ``[N]`` in (loss per unit weight)², dtype of the inputs.
    """
    validate_pair(OP, activations, grad_outputs)
    chosen = _dispatch.select_backend(
        OP, CHECKS, activations.device, activations.dtype, backend=backend
    )
    if chosen == "native":
        return torch.ops.metafluence.psg_linear_sqnorm(
            activations.contiguous(), grad_outputs.contiguous()
        )
    if chosen == "triton":
        out = _Triton.apply(activations, grad_outputs)
        assert isinstance(out, torch.Tensor)
        return out
    return _reference.psg_linear_sqnorm(activations, grad_outputs)
