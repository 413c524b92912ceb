"""Multi right-hand-side conjugate gradients with per-column early exit."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..ops import solver_update
from ._base import (
    Matvec,
    RowOperator,
    SolveResult,
    as_rows,
    check_damping,
    check_positive_int,
    eps,
    from_rows,
    relative_residual,
)

__all__ = ["solve_cg"]


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=1)


def solve_cg(
    matvec: Matvec,
    b: Tensor,
    damping: float = 0.0,
    rtol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int = 100,
    x0: Tensor | None = None,
    check_every: int = 5,
    precond: Matvec | None = None,
    shrink: bool = True,
    fused: bool | None = None,
    true_residual: bool = True,
) -> SolveResult:
    r"""Solve ``(A + damping I) x = b`` by (preconditioned) conjugate gradients.

    Each of the ``k`` right-hand sides (rows of ``b``) runs its own CG recurrence::

        alpha_j = r_jᵀ z_j / p_jᵀ A p_j
        x_{j+1} = x_j + alpha_j p_j,     r_{j+1} = r_j - alpha_j A p_j
        z_{j+1} = M⁻¹ r_{j+1},           beta_j = r_{j+1}ᵀ z_{j+1} / r_jᵀ z_j
        p_{j+1} = z_{j+1} + beta_j p_j

    batched so that one ``matvec`` call serves all active columns. A column stops when
    ``||r|| <= max(rtol ||b||, atol)``; it is then frozen by masked updates (its ``x`` no longer
    changes). The host is consulted only every ``check_every`` iterations: there the active set
    shrinks (``matvec`` is then called on the remaining rows only), and each newly converged column
    is verified against its true residual ``b - A x``; if the recurrence drifted, the column
    restarts from its current ``x`` (residual replacement).

    Negative curvature: if ``pᵀ A p <= eps · max|pᵀ A p / pᵀ p| · pᵀ p`` for a column (``A`` is not
    positive definite along ``p``), the column stops at its last iterate, the result has
    ``negative_curvature=True``, ``converged=False``, ``info["negative_curvature_columns"]`` lists
    the columns, and a ``RuntimeWarning`` is issued.

    Args:
        matvec: symmetric operator ``A`` (same-rank contract, see :mod:`._base`).
        b: right-hand sides ``[P]`` or ``[k, P]`` (float32 / float64, any device).
        damping: ``damping >= 0`` added to the diagonal.
        rtol, atol: stopping rule ``||b - (A + damping I) x|| <= max(rtol ||b||, atol)``.
        maxiter: maximum CG iterations per column.
        x0: initial guess, same shape as ``b`` (default zeros).
        check_every: iterations between host synchronisations (convergence checks).
        precond: optional SPD preconditioner ``r -> M⁻¹ r`` with the same contract as ``matvec``.
        shrink: drop finished columns from the ``matvec`` calls at check points (default). With
            ``shrink=False`` ``matvec`` (and ``precond``) always get all ``k`` rows (finished
            ones frozen by masking), for operators that need the full batch of rows.
        fused: run the vector updates of each iteration as two fused kernels for all columns
            (:func:`metafluence.ops.cg_update_`, :func:`metafluence.ops.cg_direction_`). Default
            (``None``): when a native / Triton kernel exists for ``b``'s device and dtype and no
            gradient flows through the solve; ``False``: their plain-PyTorch reference twins
            (:func:`metafluence.reference.solvers.cg_update`, ``cg_direction``), which also run
            whenever a gradient flows. The choice is :mod:`metafluence.ops`'
            (:func:`metafluence.ops.solver_update.fused_updates_backend`).

        true_residual: report the residual of every column that did not converge as
            ``‖b − (A + damping I) x‖``, one more ``matvec`` on those columns (default). With
            ``False`` the recurrence's own ``‖r‖`` is reported instead (equal in exact
            arithmetic; no extra product: for short, fixed-length solves such as a few
            preconditioned iterations); ``info["residual"]`` says which.

    Returns:
        :class:`SolveResult`; ``info`` holds ``column_iters`` ([k] int64), ``matvec_calls``,
        ``matvec_rows``, ``negative_curvature_columns`` (list of int) and ``residual``
        (``"true"`` or ``"recurrence"``).
    """
    damping = check_damping(damping)
    maxiter = check_positive_int(maxiter, "maxiter", minimum=0)
    check_every = check_positive_int(check_every, "check_every")
    if rtol < 0 or atol < 0:
        raise ValueError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    B, one_d = as_rows(b)
    k, _ = B.shape
    op = RowOperator(matvec, one_d, damping)
    pc = RowOperator(precond, one_d, 0.0, name="precond") if precond is not None else None
    dt = B.dtype
    curv_tol = eps(dt)

    b_norm = torch.linalg.vector_norm(B, dim=1)
    thr = torch.clamp(rtol * b_norm, min=atol)
    zero_col = b_norm == 0

    if x0 is not None:
        if x0.shape != b.shape:
            raise ValueError(f"x0 has shape {list(x0.shape)}, expected {list(b.shape)} like b")
        X = x0.reshape(B.shape).to(dtype=dt, device=B.device, copy=True)
        X = torch.where(zero_col[:, None], torch.zeros_like(X), X)
        R = B - op(X) if k > 0 else B.clone()
    else:
        X = torch.zeros_like(B, memory_format=torch.contiguous_format)
        R = B.clone(memory_format=torch.contiguous_format)

    R_left = torch.zeros_like(B)  # recurrence residuals of the columns as they stop
    col_iters = torch.zeros(k, dtype=torch.int64, device=B.device)
    negative = torch.zeros(k, dtype=torch.bool, device=B.device)
    verified = torch.zeros(k, dtype=torch.bool, device=B.device)  # true residual <= thr
    true_res = torch.zeros(k, dtype=dt, device=B.device)  # absolute true residual norms

    # Columns with ||b - A x0|| <= thr (incl. zero columns) are done before any iteration; their
    # residual is exact (R was computed from the operator).
    r_norm = torch.linalg.vector_norm(R, dim=1)
    done0 = r_norm <= thr
    verified |= done0
    true_res = torch.where(done0, r_norm, true_res)
    if shrink:
        active = torch.nonzero(~done0).flatten()  # host sync (once, at start)
    else:
        active = torch.arange(k, device=B.device)
    frozen_a = done0[active]  # finished rows kept in the working set (shrink=False only)
    all_frozen = bool(frozen_a.all().item()) if k > 0 else True

    Xa, Ra, Ba, thra = X[active], R[active], B[active], thr[active]
    Za = pc(Ra) if (pc is not None and active.numel() > 0) else Ra
    Pa = Za.clone()
    rza = _rowdot(Ra, Za)
    curv_max = torch.zeros(active.numel(), dtype=dt, device=B.device)
    it_a = torch.zeros(active.numel(), dtype=torch.int64, device=B.device)
    neg_a = torch.zeros(active.numel(), dtype=torch.bool, device=B.device)

    # the vector updates are the ops' (metafluence.ops.solver_update): a fused kernel when one
    # runs here, else the reference twin (out of place, differentiable); ops chooses
    fb = solver_update.fused_updates_backend(B, fused) or "reference"

    it = 0
    while it < maxiter and active.numel() > 0 and not all_frozen:
        done_a = frozen_a.clone()
        for _ in range(min(check_every, maxiter - it)):
            W = op(Pa)
            run = ~done_a
            Xa, Ra, curv_max, rr, neg = solver_update.cg_update(
                Xa, Ra, curv_max, Pa, W, rza, run, curv_tol, backend=fb
            )
            step = run & ~neg
            it_a = it_a + step.to(torch.int64)
            neg_a = neg_a | neg
            done_a = done_a | neg | (step & (rr.sqrt() <= thra))
            if pc is not None:
                Za = pc(Ra)
                rz_new = _rowdot(Ra, Za)
            else:
                Za, rz_new = Ra, rr
            Pa = solver_update.cg_direction(Pa, Za, rz_new, rza, ~done_a, backend=fb)
            rza = torch.where(done_a, rza, rz_new)
            it += 1

        # ---- check point: the only host synchronisation of the iteration ----
        claimed = done_a & ~neg_a & ~frozen_a
        claimed_idx = torch.nonzero(claimed).flatten()
        finished = neg_a.clone()
        if claimed_idx.numel() > 0:
            AX = op(Xa[claimed_idx]) if shrink else op(Xa)[claimed_idx]
            R_true = Ba[claimed_idx] - AX
            tn = torch.linalg.vector_norm(R_true, dim=1)
            ok = tn <= thra[claimed_idx]
            finished[claimed_idx] = ok
            g = active[claimed_idx]
            true_res[g] = torch.where(ok, tn, true_res[g])
            verified[g] = ok
            # residual replacement + restart for columns whose recurrence drifted
            Ra[claimed_idx] = R_true
            Z_true = pc(R_true) if pc is not None else R_true
            restart = claimed_idx[~ok]
            Pa[restart] = Z_true[~ok]
            rza[restart] = _rowdot(R_true, Z_true)[~ok]
        keep = ~finished
        if not shrink:
            frozen_a = frozen_a | finished
            all_frozen = bool(frozen_a.all().item())
        elif not bool(keep.all()):
            gone = torch.nonzero(finished).flatten()
            X[active[gone]] = Xa[gone]
            R_left[active[gone]] = Ra[gone]
            col_iters[active[gone]] = it_a[gone]
            negative[active[gone]] = neg_a[gone]
            kept = torch.nonzero(keep).flatten()
            active = active[kept]
            frozen_a = frozen_a[kept]
            Xa, Ra, Ba, thra, Pa = Xa[kept], Ra[kept], Ba[kept], thra[kept], Pa[kept]
            rza, curv_max, it_a, neg_a = rza[kept], curv_max[kept], it_a[kept], neg_a[kept]

    if active.numel() > 0:  # ran out of iterations
        X[active] = Xa
        col_iters[active] = it_a
        negative[active] = neg_a
        R_left[active] = Ra

    # honest residuals for everything not verified (not converged or negative curvature)
    todo = torch.nonzero(~verified).flatten()
    if todo.numel() > 0 and true_residual:
        AX = op(X[todo]) if shrink else op(X)[todo]
        true_res[todo] = torch.linalg.vector_norm(B[todo] - AX, dim=1)
    elif todo.numel() > 0:
        true_res[todo] = torch.linalg.vector_norm(R_left[todo], dim=1)
    rel = relative_residual(true_res, b_norm)
    col_conv = verified & ~negative
    neg_cols = [int(i) for i in torch.nonzero(negative).flatten().tolist()]
    if neg_cols:
        warnings.warn(
            f"solve_cg: negative curvature (pᵀ(A + damping I)p <= 0) in column(s) {neg_cols}; "
            "the operator is not positive definite, those columns stopped unconverged "
            "(increase damping or use another solver)",
            RuntimeWarning,
            stacklevel=2,
        )
    return SolveResult(
        x=from_rows(X, one_d),
        iters=int(col_iters.max().item()) if k > 0 else 0,
        residual=from_rows(rel, one_d),
        converged=bool(col_conv.all().item()),
        column_converged=from_rows(col_conv, one_d),
        negative_curvature=bool(neg_cols),
        info={
            "column_iters": from_rows(col_iters, one_d),
            "negative_curvature_columns": neg_cols,
            "matvec_calls": op.calls,
            "matvec_rows": op.rows,
            "residual": "true" if true_residual else "recurrence",
        },
    )
