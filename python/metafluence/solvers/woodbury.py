"""Exact inverse of ``γI + U W Uᵀ`` for tall-skinny ``U`` (Woodbury identity).

``woodbury_factor`` / ``woodbury_apply`` factor the ``r × r`` core once and apply it to many
right-hand sides (the implicit engine's inner solves); ``solve_woodbury`` /
``solve_woodbury_batched`` are the checked one-shot solves with residuals (``SolveResult``).
"""

from __future__ import annotations

from dataclasses import dataclass

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

__all__ = [
    "WoodburyFactor",
    "solve_woodbury",
    "solve_woodbury_batched",
    "woodbury_apply",
    "woodbury_factor",
]


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


@dataclass(frozen=True)
class WoodburyFactor:
    r"""``γI_P + U W Uᵀ`` factored once for many solves (``r × r`` core, ``M`` batched).

    ``U`` ``[M, P, r]``; ``weights`` ``W`` ``[M, r, r]`` or ``None`` (identity). Without ``W`` the
    core ``γI_r + UᵀU`` is SPD: ``chol`` is its Cholesky factor (``lu`` is ``None`` unless the
    factorisation failed); with ``W`` the core ``γI_r + W UᵀU`` is LU-factored (``lu``).
    """

    U: Tensor
    gamma: float
    weights: Tensor | None
    chol: Tensor | None
    lu: tuple[Tensor, Tensor] | None


def woodbury_factor(U: Tensor, damping: float, weights: Tensor | None = None) -> WoodburyFactor:
    r"""Factor ``γI + U W Uᵀ`` (``γ = damping > 0``) for :func:`woodbury_apply`.

    ``U`` ``[M, P, r]``; ``weights`` ``[M, r]`` (diagonal) or ``[M, r, r]``. Cost
    ``O(M(P r² + r³))``; no input checks (the public :func:`solve_woodbury_batched` does them).
    """
    r = U.shape[-1]
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    gram = U.transpose(-1, -2) @ U  # [M, r, r]
    if weights is None:
        core = gram + damping * eye
        L, info = torch.linalg.cholesky_ex(core)
        if bool((info == 0).all()):
            return WoodburyFactor(U, damping, None, L, None)
        return WoodburyFactor(U, damping, None, None, torch.linalg.lu_factor(core))
    W = torch.diag_embed(weights) if weights.dim() == U.dim() - 1 else weights
    return WoodburyFactor(U, damping, W, None, torch.linalg.lu_factor(damping * eye + W @ gram))


def woodbury_apply(f: WoodburyFactor, V: Tensor) -> Tensor:
    r"""``(γI + U W Uᵀ)⁻¹ v`` for the rows of ``V`` ``[M, k, P]`` → ``[M, k, P]``::

    x = (v − U (γI_r + W UᵀU)⁻¹ W Uᵀ v) / γ        (push-through identity; W = I: Cholesky)
    """
    Ut_v = f.U.transpose(-1, -2) @ V.transpose(-1, -2)  # [M, r, k]
    if f.weights is not None:
        Ut_v = f.weights @ Ut_v
    if f.chol is not None:
        C = torch.cholesky_solve(Ut_v, f.chol)
    else:
        assert f.lu is not None
        C = torch.linalg.lu_solve(f.lu[0], f.lu[1], Ut_v)
    return (V - (f.U @ C).transpose(-1, -2)) / f.gamma


def _woodbury(U: Tensor, V: Tensor, gamma: float, weights: Tensor | None) -> Tensor:
    """Batched core. ``U`` ``[M, P, r]``, ``V`` ``[M, k, P]`` (rows) -> ``X`` ``[M, k, P]``."""
    return woodbury_apply(woodbury_factor(U, gamma, weights), V)


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
