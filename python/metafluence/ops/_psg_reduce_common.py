"""Validation and autograd formulas shared by ``psg_linear_sqnorm`` and ``psg_linear_dot`` (and
the tensor-pair check of every per-sample-gradient op)."""

from __future__ import annotations

from typing import Any

import torch


def check_tensor_pair(
    op: str, activations: Any, grad_outputs: Any, a_spec: str, g_spec: str
) -> None:
    """Both are floating tensors with as many dims as their spec (``"[N, T, in]"``), on one
    device, of one dtype (messages name the argument). Shared by the linear and conv ops."""
    for name, x, spec in (
        ("activations", activations, a_spec),
        ("grad_outputs", grad_outputs, g_spec),
    ):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor {spec}, got {type(x)}")
        if x.dim() != spec.count(",") + 1:
            raise ValueError(
                f"{op}: {name} has {x.dim()} dims (shape {list(x.shape)}), expected {spec}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(
                f"{op}: {name} has dtype {x.dtype}, expected a floating dtype "
                "(float32 or float64 for the fast backends)"
            )
    if activations.device != grad_outputs.device:
        raise ValueError(
            f"{op}: activations is on {activations.device} but grad_outputs is on "
            f"{grad_outputs.device}; expected both on the same device"
        )
    if activations.dtype != grad_outputs.dtype:
        raise TypeError(
            f"{op}: activations has dtype {activations.dtype} but grad_outputs has "
            f"{grad_outputs.dtype}; expected the same dtype"
        )


def validate_pair(op: str, activations: Any, grad_outputs: Any) -> None:
    """Check ``activations [N, T, in]`` and ``grad_outputs [N, T, out]`` (names in messages)."""
    check_tensor_pair(op, activations, grad_outputs, "[N, T, in]", "[N, T, out]")
    if activations.shape[:2] != grad_outputs.shape[:2]:
        raise ValueError(
            f"{op}: activations {list(activations.shape)} expected [N, T, in] and "
            f"grad_outputs {list(grad_outputs.shape)} expected [N, T, out] with the same N and T"
        )


def check_vectors(
    op: str, v: Any, want: tuple[int, ...], spec: str, activations: torch.Tensor
) -> None:
    """``vectors`` is ``[m, *want]`` (``spec`` names the dims) of the dtype and device of
    ``activations``."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{op}: vectors must be a torch.Tensor {spec}, got {type(v)}")
    if v.dim() != len(want) + 1:
        raise ValueError(
            f"{op}: vectors has {v.dim()} dims (shape {list(v.shape)}), expected {spec}"
        )
    if tuple(v.shape[1:]) != want:
        raise ValueError(
            f"{op}: vectors {list(v.shape)} expected [m, {', '.join(map(str, want))}] {spec}"
        )
    if v.dtype != activations.dtype:
        raise TypeError(
            f"{op}: vectors has dtype {v.dtype} but activations has {activations.dtype}; "
            "expected the same dtype"
        )
    if v.device != activations.device:
        raise ValueError(
            f"{op}: vectors is on {v.device} but activations is on {activations.device}"
        )


def validate_vectors(
    op: str, activations: torch.Tensor, grad_outputs: torch.Tensor, v: Any
) -> None:
    """``vectors [m, out, in]`` for ``activations [N, T, in]``, ``grad_outputs [N, T, out]``."""
    want = (grad_outputs.shape[2], activations.shape[2])
    check_vectors(op, v, want, "[m, out, in]", activations)


def _grads_from_dG(
    d_g: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given ``dG [N, out, in]`` for ``G = einsum('nto,nti->noi', g, a)``: ``(d a, d g)``."""
    return torch.bmm(grad_outputs, d_g), torch.bmm(activations, d_g.transpose(1, 2))


def _per_sample(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nto,nti->noi", grad_outputs, activations)


def sqnorm_backward(
    grad: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``out[n] = ‖G_n‖²``: ``dG_n = 2 grad[n] G_n`` (forms ``G``: backward only)."""
    d_g = 2.0 * grad[:, None, None] * _per_sample(activations, grad_outputs)
    return _grads_from_dG(d_g, activations, grad_outputs)


def dot_backward(
    grad: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``out[n, j] = ⟨G_n, v_j⟩``: ``dG_n = Σ_j grad[n, j] v_j``,
    ``d v_j = Σ_n grad[n, j] G_n``."""
    d_g = torch.einsum("nm,moi->noi", grad, v)
    d_a, d_gout = _grads_from_dG(d_g, activations, grad_outputs)
    d_v = torch.einsum("nm,noi->moi", grad, _per_sample(activations, grad_outputs))
    return d_a, d_gout, d_v
