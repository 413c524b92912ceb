"""Exact inverse of ``γI + U W Uᵀ`` for tall-skinny ``U`` (Woodbury identity)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import (
    SolveResult,
    check_damping,
    check_float_tensor,
    check_same_device,
    default_rtol,
    relative_residual,
)

__all__ = ["solve_woodbury", "solve_woodbury_batched"]


def _check_inputs(U: Tensor, v: Tensor, weights: Tensor | None) -> None:
    """Types, finiteness and devices of ``U``, ``v``, ``weights`` (messages name them)."""
    check_float_tensor(U, "U")
    check_float_tensor(v, "v")
    check_same_device(v, "v", U, "U")
    if weights is not None:
        check_float_tensor(weights, "weights")
        check_same_device(weights, "weights", U, "U")


def _check_weights(weights: Tensor | None, r: int, lead: tuple[int, ...]) -> None:
    if weights is None:
        return
    shape = tuple(weights.shape)
    if shape not in ((*lead, r), (*lead, r, r)):
        want = f"{list((*lead, r))} or {list((*lead, r, r))}"
        raise ValueError(f"weights has shape {list(shape)}, expected {want}")


def _woodbury(U: Tensor, V: Tensor, gamma: float, weights: Tensor | None) -> Tensor:
    """Batched core. ``U`` ``[M, P, r]``, ``V`` ``[M, k, P]`` (rows) -> ``X`` ``[M, k, P]``."""
    r = U.shape[-1]
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    Ut_v = U.transpose(-1, -2) @ V.transpose(-1, -2)  # [M, r, k]
    gram = U.transpose(-1, -2) @ U  # [M, r, r]
    if weights is None:
        # (γI + UUᵀ)⁻¹ v = (v - U (γI_r + UᵀU)⁻¹ Uᵀ v) / γ   (SPD core: Cholesky)
        core = gram + gamma * eye
        L, info = torch.linalg.cholesky_ex(core)
        if bool((info == 0).all()):
            C = torch.cholesky_solve(Ut_v, L)
        else:
            C = torch.linalg.solve(core, Ut_v)
    else:
        W = torch.diag_embed(weights) if weights.dim() == U.dim() - 1 else weights
        # (γI + UWUᵀ)⁻¹ v = (v - U (γI_r + W UᵀU)⁻¹ W Uᵀ v) / γ   (push-through identity)
        C = torch.linalg.solve(gamma * eye + W @ gram, W @ Ut_v)
    return (V - (U @ C).transpose(-1, -2)) / gamma


def _result(
    U: Tensor,
    V: Tensor,
    X: Tensor,
    gamma: float,
    weights: Tensor | None,
    out_shape: torch.Size,
    res_shape: tuple[int, ...],
) -> SolveResult:
    Ut_x = U.transpose(-1, -2) @ X.transpose(-1, -2)  # [M, r, k]
    if weights is not None:
        W = torch.diag_embed(weights) if weights.dim() == U.dim() - 1 else weights
        Ut_x = W @ Ut_x
    AX = gamma * X + (U @ Ut_x).transpose(-1, -2)
    res = relative_residual(
        torch.linalg.vector_norm(V - AX, dim=-1), torch.linalg.vector_norm(V, dim=-1)
    )
    col_conv = res <= default_rtol(X.dtype)
    return SolveResult(
        x=X.reshape(out_shape),
        iters=0,
        residual=res.reshape(res_shape),
        converged=bool(col_conv.all().item()),
        column_converged=col_conv.reshape(res_shape),
        info={"rank": U.shape[-1]},
    )


def solve_woodbury(
    U: Tensor, v: Tensor, damping: float, weights: Tensor | None = None
) -> SolveResult:
    r"""Exact solve of ``(γ I_P + U W Uᵀ) x = v`` with ``γ = damping > 0`` and tall-skinny ``U``.

    By the Woodbury / push-through identity::

        x = (v - U (γ I_r + W UᵀU)⁻¹ W Uᵀ v) / γ          (W = I:  (γ I_r + UᵀU)⁻¹, Cholesky)

    an ``r × r`` solve instead of ``P × P`` (``r = n_support · C`` for the Gauss-Newton part of an
    inner Hessian: ``U`` stacks per-sample logit Jacobians). Cost ``O(P r² + r³ + P r k)``.

    Args:
        U: ``[P, r]``.
        v: ``[P]`` or ``[k, P]`` (rows).
        damping: ``γ > 0``.
        weights: optional ``W``: ``[r]`` (diagonal) or ``[r, r]``; default identity.

    Returns:
        :class:`SolveResult` (``iters=0``); ``residual`` measured from ``γx + UWUᵀx``.
    """
    gamma = check_damping(damping, positive=True)
    _check_inputs(U, v, weights)
    if U.dim() != 2:
        raise ValueError(f"U has {U.dim()} dims, expected [P, r]")
    P, r = U.shape
    if v.dim() not in (1, 2) or v.shape[-1] != P:
        raise ValueError(f"v has shape {list(v.shape)}, expected [{P}] or [k, {P}] to match U")
    _check_weights(weights, r, ())
    V = v.reshape(1, 1 if v.dim() == 1 else v.shape[0], P).to(U.dtype)
    Wb = None if weights is None else weights.unsqueeze(0).to(U.dtype)
    Ub = U.unsqueeze(0)
    X = _woodbury(Ub, V, gamma, Wb)
    res_shape: tuple[int, ...] = () if v.dim() == 1 else (v.shape[0],)
    return _result(Ub, V, X, gamma, Wb, v.shape, res_shape)


def solve_woodbury_batched(
    U: Tensor, v: Tensor, damping: float, weights: Tensor | None = None
) -> SolveResult:
    r"""Batched :func:`solve_woodbury` over ``M`` tasks: ``(γI + U_m W_m U_mᵀ) x_m = v_m``.

    Args:
        U: ``[M, P, r]``.
        v: ``[M, P]`` or ``[M, k, P]``.
        damping: ``γ > 0`` (shared).
        weights: ``[M, r]`` or ``[M, r, r]``.

    Returns:
        :class:`SolveResult` with ``x`` shaped like ``v`` and ``residual`` / ``column_converged``
        of shape ``[M]`` or ``[M, k]``.
    """
    gamma = check_damping(damping, positive=True)
    _check_inputs(U, v, weights)
    if U.dim() != 3:
        raise ValueError(f"U has {U.dim()} dims, expected [M, P, r]")
    M, P, r = U.shape
    if v.dim() not in (2, 3) or v.shape[0] != M or v.shape[-1] != P:
        raise ValueError(
            f"v has shape {list(v.shape)}, expected [{M}, {P}] or [{M}, k, {P}] to match U"
        )
    _check_weights(weights, r, (M,))
    V = v.reshape(M, 1 if v.dim() == 2 else v.shape[1], P).to(U.dtype)
    Wb = None if weights is None else weights.to(U.dtype)
    X = _woodbury(U, V, gamma, Wb)
    res_shape: tuple[int, ...] = (M,) if v.dim() == 2 else (M, v.shape[1])
    return _result(U, V, X, gamma, Wb, v.shape, res_shape)
