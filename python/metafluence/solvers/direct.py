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
    check_device,
    check_dtype,
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
    check_dtype(dtype)
    device = check_device(device)
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
    ``Â = (A + Aᵀ)/2 + damping I``, and factorised: Cholesky when ``Â`` is (numerically) positive
    definite; otherwise the spectral solve ``x = Σ_i u_i u_iᵀ b / μ_i`` from ``Â = Σ μ_i u_i u_iᵀ``
    (``torch.linalg.eigh``), dropping ``|μ_i| <= P · eps · max|μ|`` so that a singular ``Â``
    gives the minimum-norm least-squares solution (``info["method"]``: ``"cholesky"``,
    ``"eigh"`` or ``"eigh_pinv"``). Costs ``O(P³)`` time and
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
    L, chol_info = torch.linalg.cholesky_ex(A_sym)
    d = torch.diagonal(L).abs()
    # Cholesky pivots also flag numerically singular PSD matrices: d_min² <= P·eps·d_max²
    well_posed = (
        int(chol_info.item()) == 0
        and P > 0
        and bool((d.min() ** 2 > P * eps(dt) * d.max() ** 2).item())
    )
    if well_posed or P == 0:
        method = "cholesky"
        X = torch.cholesky_solve(rhs, L)
    else:
        # symmetric indefinite or singular: spectral solve, min-norm on the numerical null space
        evals, evecs = torch.linalg.eigh(A_sym)
        cutoff = evals.abs().max() * P * eps(dt)
        keep = evals.abs() > cutoff
        method = "eigh" if bool(keep.all().item()) else "eigh_pinv"
        inv = torch.where(keep, 1.0 / torch.where(keep, evals, 1.0), 0.0)
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
