"""Dense solve for small problems: materialise ``A`` from its ``matvec``."""

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
    default_rtol,
    eps,
    from_rows,
    relative_residual,
)

__all__ = ["dense_matrix", "solve_direct"]

MAX_DIM = 20000


def _dense(
    op: RowOperator, dim: int, dtype: torch.dtype, device: torch.device | str | None, chunk: int
) -> Tensor:
    rows = []
    for start in range(0, dim, chunk):
        stop = min(start + chunk, dim)
        E = torch.zeros(stop - start, dim, dtype=dtype, device=device)
        E[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=device)
        rows.append(op(E))
    if not rows:
        return torch.zeros(0, 0, dtype=dtype, device=device)
    # row j holds (A e_j)ᵀ, i.e. column j of A: the stack is Aᵀ
    return torch.cat(rows, dim=0).T.contiguous()


def dense_matrix(
    matvec: Matvec,
    dim: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    chunk: int = 256,
    batched: bool = True,
) -> Tensor:
    """Materialise the ``[P, P]`` matrix of a linear operator: ``A[:, j] = matvec(e_j)``.

    The identity is applied in chunks of ``chunk`` rows (``[chunk, P]`` per call) when
    ``batched``; otherwise ``matvec`` is called once per basis vector with a ``[P]`` tensor. No
    symmetrisation is done here. Memory: ``P² `` entries, so only for small ``P``.
    """
    check_positive_int(dim, "dim", minimum=0)
    check_positive_int(chunk, "chunk")
    return _dense(RowOperator(matvec, one_d=not batched), dim, dtype, device, chunk)


def solve_direct(
    matvec: Matvec,
    b: Tensor,
    damping: float = 0.0,
    dim: int | None = None,
    max_dim: int = MAX_DIM,
    chunk: int = 256,
    rtol: float | None = None,
) -> SolveResult:
    r"""Solve ``(A + damping I) x = b`` exactly by forming the dense matrix.

    ``A`` is materialised with :func:`dense_matrix` (``P`` matvec columns, in chunks of ``chunk``
    when ``b`` is ``[k, P]``, one by one when ``b`` is ``[P]``), symmetrised
    ``Â = (A + Aᵀ)/2 + damping I``, and factorised: Cholesky when ``Â`` is positive definite,
    else LU (``torch.linalg.solve``), else (singular) the minimum-norm least-squares solution
    from the eigendecomposition of ``Â`` (``info["method"]`` says which). Costs ``O(P³)`` time and
    ``O(P²)`` memory.

    The residual is measured against the operator as given (unsymmetrised), so it is honest
    if ``matvec`` is not quite symmetric. ``converged`` means residual ``<= rtol`` (default
    ``sqrt(eps)`` of the dtype).

    Args:
        matvec: operator (same-rank contract); b: ``[P]`` or ``[k, P]``.
        damping: ``>= 0``; dim: ``P`` (checked against ``b`` if given).
        max_dim: refuse (``ValueError``) when ``P > max_dim`` (default 20000).
        chunk: identity rows per matvec call.
    """
    damping = check_damping(damping)
    B, one_d = as_rows(b)
    _, P = B.shape
    if dim is not None and dim != P:
        raise ValueError(f"dim={dim} does not match b of shape {list(b.shape)} (P={P})")
    if P > max_dim:
        raise ValueError(
            f"solve_direct: P={P} exceeds max_dim={max_dim}; forming a {P}x{P} matrix is too "
            "expensive (raise max_dim or use solve_cg)"
        )
    dt, dev = B.dtype, B.device
    op = RowOperator(matvec, one_d)
    A = _dense(op, P, dt, dev, chunk)  # the operator as given
    A_sym = 0.5 * (A + A.T)
    if damping != 0.0:
        A_sym = A_sym + damping * torch.eye(P, dtype=dt, device=dev)
    rhs = B.T  # [P, k]
    method = "cholesky"
    L, chol_info = torch.linalg.cholesky_ex(A_sym)
    if int(chol_info.item()) == 0:
        X = torch.cholesky_solve(rhs, L)
    else:
        method = "lu"
        X, lu_info = torch.linalg.solve_ex(A_sym, rhs)
        if int(lu_info.item()) != 0 or not bool(torch.isfinite(X).all()):
            method = "eigh_pinv"
            evals, evecs = torch.linalg.eigh(A_sym)
            cutoff = evals.abs().max() * P * eps(dt)
            inv = torch.where(evals.abs() > cutoff, 1.0 / evals, torch.zeros_like(evals))
            X = evecs @ (inv[:, None] * (evecs.T @ rhs))
    X = X.T.contiguous()  # [k, P]
    R = B - X @ A.T - damping * X
    res = relative_residual(torch.linalg.vector_norm(R, dim=1), torch.linalg.vector_norm(B, dim=1))
    tol = default_rtol(dt) if rtol is None else rtol
    col_conv = res <= tol
    return SolveResult(
        x=from_rows(X, one_d),
        iters=0,
        residual=from_rows(res, one_d),
        converged=bool(col_conv.all().item()),
        column_converged=from_rows(col_conv, one_d),
        info={"method": method, "matvec_calls": op.calls},
    )
