"""``psg_linear``: per-sample weight gradients of a linear layer (the template for every op).

``out[n] = sum_t grad_outputs[n, t, :]^T (outer) activations[n, t, :]`` -- the gradient of
sample ``n``'s loss w.r.t. the weight ``W`` of ``y = x W^T``, summed over the ``T`` positions
that share ``W`` (``T = 1`` for a plain MLP layer).

Backends (see :mod:`metafluence.ops._dispatch`): ``native`` (``torch.ops.metafluence.psg_linear``:
C++ on CPU, CUDA kernel on GPU), ``triton`` and ``reference``
(:func:`metafluence.reference.psg_linear`). All are differentiable.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import _loader
from ..reference import psg as _reference
from . import _dispatch
from ._psg_reduce_common import validate_pair

__all__ = ["psg_linear"]

OP = "psg_linear"
QUALNAME = f"metafluence::{OP}"
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

# auto on CPU tries the reference first: in benchmarks/results/psg_linear.csv (1 thread) the
# native CPU kernel was slower than the reference at every measured shape (e.g. 0.26 against
# 0.094 ms at N=64, T=16, 64x64; 0.16 against 0.091 ms at N=97, T=5, 512x10).
CHECKS = _dispatch.register_op(
    OP,
    {
        "native": _dispatch.native_check(OP, DTYPES),
        "triton": _dispatch.triton_check(DTYPES),
        "reference": _dispatch.reference_check,
    },
    cpu_order=("reference", "native"),
)


def _backward_formula(
    grad: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``out = einsum('nto,nti->noi', g, a)`` given ``grad = d/d out``:
    ``d a = einsum('noi,nto->nti')`` and ``d g = einsum('noi,nti->nto')``."""
    d_act = torch.bmm(grad_outputs, grad)  # [N, T, out] @ [N, out, in] -> [N, T, in]
    d_gout = torch.bmm(activations, grad.transpose(1, 2))  # [N, T, in] @ [N, in, out]
    return d_act, d_gout


# ---- registrations on the compiled op (fake impl for meta/FakeTensor, autograd formula) ----
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
        n, _, i = activations.shape
        return activations.new_empty((n, grad_outputs.shape[2], i))

    def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        activations, grad_outputs = inputs
        ctx.save_for_backward(activations, grad_outputs)

    def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations, grad_outputs = ctx.saved_tensors
        return _backward_formula(grad, activations, grad_outputs)

    torch.library.register_autograd(QUALNAME, _backward, setup_context=_setup_context)
    return True


NATIVE_REGISTERED = _register_native()


class _TritonPsgLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        from ..kernels.triton.psg_linear import psg_linear as triton_psg_linear

        ctx.save_for_backward(activations, grad_outputs)
        return triton_psg_linear(activations, grad_outputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        activations, grad_outputs = ctx.saved_tensors
        return _backward_formula(grad, activations, grad_outputs)


# ---- entry point -----------------------------------------------------------------------------
def psg_linear(
    activations: torch.Tensor, grad_outputs: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Per-sample weight gradients of a linear map.

    ``out[n, o, i] = sum_t grad_outputs[n, t, o] * activations[n, t, i]``
    (``einsum('nto,nti->noi')``).

    Args:
        activations: layer inputs ``[N, T, in]``.
        grad_outputs: gradients of each sample's loss w.r.t. the layer outputs ``[N, T, out]``,
            same dtype and device as ``activations``.
        backend: ``"native"``, ``"triton"``, ``"reference"`` (alias ``"torch"``) or ``None``
            (``METAFLUENCE_BACKEND``, else automatic).

    Returns:
        ``[N, out, in]`` per-sample gradients, in the dtype of the inputs.

    Raises:
        ValueError / TypeError: bad shapes, dtypes or devices (the message names the argument).
        BackendUnavailableError: the requested backend cannot run here (the message lists why
            each backend was accepted or rejected).
    """
    validate_pair(OP, activations, grad_outputs)
    chosen = _dispatch.select_backend(
        OP, CHECKS, activations.device, activations.dtype, backend=backend
    )
    if chosen == "native":
        return torch.ops.metafluence.psg_linear(activations.contiguous(), grad_outputs.contiguous())
    if chosen == "triton":
        out = _TritonPsgLinear.apply(activations, grad_outputs)
        assert isinstance(out, torch.Tensor)
        return out
    return _reference.psg_linear(activations, grad_outputs)
