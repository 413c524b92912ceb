"""Low-rank inverse on the top eigenspace (Schioppa et al., "Scaling up influence functions")."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import (
    Matvec,
    RowOperator,
    SolveResult,
    as_rows,
    check_damping,
    check_positive_int,
    from_rows,
    relative_residual,
)
from .eigen import krylov_basis

__all__ = ["solve_arnoldi"]


def solve_arnoldi(
    matvec: Matvec,
    b: Tensor,
    damping: float = 0.0,
    rank: int = 20,
    iters: int | None = None,
    seed: int = 0,
    rtol: float = 1e-6,
) -> SolveResult:
    r"""Approximate ``(A + damping I)⁻¹ b`` on the top eigenspace of a symmetric ``A``.

    Arnoldi (for symmetric ``A``: Lanczos with full reorthogonalisation, see
    :func:`~metafluence.solvers.eigen.krylov_basis`) runs ``m = min(iters, P)`` steps from a
    random start vector (``iters`` defaults to ``min(P, 2 · rank + 10)``) and gives the Ritz
    pairs ``(λ_i, u_i)`` of ``T = V A Vᵀ``. The ``rank`` Ritz pairs of largest ``|λ_i|`` (the
    "top" eigenspace) define::

        x = U diag(1 / (λ_i + damping)) Uᵀ b,   U = [u_1 .. u_rank]  ([P, rank]).

    The component of ``b`` outside ``span(U)`` is dropped, so the solve is exact only when ``A`` has
    rank ``<= rank`` (or ``rank = P``); otherwise the residual, computed honestly with one extra
    ``matvec``, reports what is left (``converged`` means residual ``<= rtol``). Ritz values with
    ``λ_i + damping = 0`` are dropped.

    Args:
        matvec: symmetric operator (same-rank contract); b: ``[P]`` or ``[k, P]``.
        damping: ``>= 0``; rank: number of eigenpairs kept; iters: Krylov steps (``>= rank``).
        seed: start vector seed; rtol: tolerance for ``converged``.

    Returns:
        :class:`SolveResult` with ``info["eigenvalues"]`` (``[rank]``, of ``A`` without damping,
        descending magnitude) and ``info["eigenvectors"]`` (``[rank, P]``, rows).
    """
    damping = check_damping(damping)
    rank = check_positive_int(rank, "rank")
    B, one_d = as_rows(b)
    k, P = B.shape
    dt, dev = B.dtype, B.device
    if iters is None:
        iters = max(1, min(P, 2 * rank + 10))
    iters = check_positive_int(iters, "iters")
    if iters < min(rank, P):
        raise ValueError(f"iters={iters} must be >= rank={rank} (or >= P={P})")
    op = RowOperator(matvec, one_d)  # undamped: eigenpairs of A
    m = min(iters, P)
    if P == 0 or k == 0:
        evals = torch.zeros(0, dtype=dt, device=dev)
        U = torch.zeros(0, P, dtype=dt, device=dev)
        X = torch.zeros_like(B)
    else:
        V, T = krylov_basis(op, P, dt, dev, m, seed)
        theta, Y = torch.linalg.eigh(T)
        order = torch.argsort(theta.abs(), descending=True)[: min(rank, m)]
        evals = theta[order]
        U = Y[:, order].T @ V  # [rank, P] Ritz vectors as rows
        denom = evals + damping
        inv = torch.where(denom != 0, 1.0 / torch.where(denom != 0, denom, 1.0), 0.0)
        X = ((B @ U.T) * inv) @ U  # [k, P]
    b_norm = torch.linalg.vector_norm(B, dim=1)
    if k > 0 and P > 0:
        R = B - op(X) - damping * X
        res = relative_residual(torch.linalg.vector_norm(R, dim=1), b_norm)
    else:
        res = torch.zeros(k, dtype=dt, device=dev)
    col_conv = res <= rtol
    return SolveResult(
        x=from_rows(X, one_d),
        iters=m if P > 0 and k > 0 else 0,
        residual=from_rows(res, one_d),
        converged=bool(col_conv.all().item()),
        column_converged=from_rows(col_conv, one_d),
        info={"eigenvalues": evals, "eigenvectors": U, "matvec_calls": op.calls},
    )
