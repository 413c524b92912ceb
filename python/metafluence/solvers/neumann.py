"""Neumann-series (LiSSA) solver with an automatic, self-correcting scale."""

from __future__ import annotations

import math
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
from .eigen import power_iteration

__all__ = ["solve_neumann"]

_SAFETY = 1.05  # σ = 1.05 · λ_max estimate
_GROWTH_TOL = 1e-3  # relative residual growth that signals σ < λ_max / 2


def solve_neumann(
    matvec: Matvec,
    b: Tensor,
    damping: float = 0.0,
    scale: float | None = None,
    maxiter: int = 100,
    rtol: float = 1e-6,
    check_every: int = 5,
    power_iters: int = 20,
    seed: int = 0,
    shrink: bool = True,
    fused: bool | None = None,
) -> SolveResult:
    r"""Solve ``(A + damping I) x = b`` by the truncated Neumann series (LiSSA form).

    With ``Ã = A + damping I`` and a scale ``σ``::

        x_0 = 0,   x_{t+1} = b / σ + (I - Ã / σ) x_t = x_t + (b - Ã x_t) / σ,

    i.e. ``x_t = σ⁻¹ Σ_{s<t} (I - Ã/σ)^s b → Ã⁻¹ b``. The residual obeys
    ``r_{t+1} = (I - Ã/σ) r_t``; for SPD ``Ã`` and ``σ > λ_max / 2`` the map is a contraction, so
    ``||r_t||`` never increases and the error decays like ``(1 - λ_min/σ)^t``: slow when ``Ã`` is
    ill-conditioned (the result then says ``converged=False``).

    Scale: ``σ = 1.05 · λ̂_max`` with ``λ̂_max`` from ``power_iters`` steps of power iteration on
    ``Ã`` unless ``scale`` is given. A power-iteration estimate can only underestimate
    ``λ_max``; if at a check point some residual grew above its best value by more than 0.1 %,
    ``σ`` is doubled and the columns restart from their best iterate (``info["scale_increases"]``
    counts this). With a user ``scale`` the iteration stops with a ``RuntimeWarning`` instead. In
    all cases each column returns its best iterate seen, so the residual never exceeds the initial
    ``||b||``.

    Each iteration costs one ``matvec`` on the active rows and yields the exact residual of the
    current iterate (no extra matvec for checks); the host is synchronised every ``check_every``
    iterations only.

    Args:
        matvec: symmetric operator ``A`` (same-rank contract); b: ``[P]`` or ``[k, P]``.
        damping: ``>= 0`` added to the diagonal.
        scale: ``σ`` (``> 0``); default automatic.
        maxiter: maximum iterations; rtol: stop a column when ``||r|| <= rtol ||b||``.
        check_every: iterations between host synchronisations.
        power_iters, seed: power iteration for the automatic scale.
        shrink: drop finished columns from the ``matvec`` calls at check points (default). With
            ``shrink=False`` ``matvec`` always gets all ``k`` rows (the power iteration then also
            runs on ``k`` probe rows and takes the largest Rayleigh quotient).
        fused: compute ``r = b - Ãx``, ``||r||`` and the next ``x`` in one fused kernel per
            iteration for all columns (:func:`metafluence.ops.neumann_step_`). Default
            (``None``): when a native / Triton kernel exists for ``b``'s device and dtype and no
            gradient flows through the solve; ``False``: the plain-PyTorch loop (reference).

    Returns:
        :class:`SolveResult` with ``info["scale"]`` (final σ), ``info["initial_scale"]``,
        ``info["lambda_max_estimate"]`` (auto scale only), ``info["scale_increases"]``,
        ``info["column_iters"]``.
    """
    damping = check_damping(damping)
    maxiter = check_positive_int(maxiter, "maxiter", minimum=0)
    check_every = check_positive_int(check_every, "check_every")
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    B, one_d = as_rows(b)
    k, P = B.shape
    dt, dev = B.dtype, B.device
    op = RowOperator(matvec, one_d, damping)
    info: dict[str, object] = {}

    auto = scale is None
    if scale is None:
        power_iters = check_positive_int(power_iters, "power_iters")
        lam = (
            power_iteration(op, P, dt, dev, power_iters, seed, rows=1 if shrink else k)
            if P > 0 and k > 0
            else 1.0
        )
        info["lambda_max_estimate"] = lam
        sigma = _SAFETY * abs(lam) if math.isfinite(lam) and lam != 0.0 else 1.0
    else:
        sigma = float(scale)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
    info["initial_scale"] = sigma
    increases = 0

    b_norm = torch.linalg.vector_norm(B, dim=1)
    thr = rtol * b_norm
    X = torch.zeros_like(B, memory_format=torch.contiguous_format)
    res = b_norm.clone()  # ||b - Ã x|| of the returned iterate (x = 0 initially)
    col_iters = torch.zeros(k, dtype=torch.int64, device=dev)
    done = res <= thr
    if shrink:
        active = torch.nonzero(~done).flatten()  # host sync (start)
    else:
        active = torch.arange(k, device=dev)
    frozen_a = done[active]  # finished rows kept in the working set (shrink=False only)
    all_frozen = bool(frozen_a.all().item()) if k > 0 else True

    Ba, thra = B[active], thr[active]
    Xa = X[active]
    Ra = Ba.clone()
    rn = b_norm[active]
    best_X, best_res = Xa.clone(), rn.clone()
    it_a = torch.zeros(active.numel(), dtype=torch.int64, device=dev)
    floor = 10 * eps(dt) * b_norm[active]

    fb = solver_update.fused_updates_backend(B, fused)
    it = 0
    diverged = False
    while it < maxiter and active.numel() > 0 and not diverged and not all_frozen:
        done_a = frozen_a.clone()
        inv_sigma = 1.0 / sigma
        n_inner = min(check_every, maxiter - it)
        n_plain = n_inner
        if fb is not None:
            # fused: the first step of the block here, each later one inside neumann_step_
            Xa = Xa + torch.where(~done_a, inv_sigma, 0.0)[:, None] * Ra
            for j in range(n_inner):
                upd = ~done_a
                W = op(Xa)
                if W.requires_grad:  # gradient flows through the matvec: plain loop from here
                    fb = None
                    Ra_new = Ba - W
                    rn_new = torch.linalg.vector_norm(Ra_new, dim=1)
                    Ra = torch.where(upd[:, None], Ra_new, Ra)
                else:
                    rn_new = solver_update.neumann_step_(
                        Xa, Ra, Ba, W, upd, thra, inv_sigma, j < n_inner - 1, backend=fb
                    )
                rn = torch.where(upd, rn_new, rn)
                it_a = it_a + upd.to(torch.int64)
                done_a = done_a | (rn <= thra)
                it += 1
                n_plain = n_inner - j - 1
                if fb is None:
                    break
            else:
                n_plain = 0
        for _ in range(n_plain):
            upd = ~done_a
            Xa = Xa + torch.where(upd, inv_sigma, 0.0)[:, None] * Ra
            Ra_new = Ba - op(Xa)
            rn_new = torch.linalg.vector_norm(Ra_new, dim=1)
            Ra = torch.where(upd[:, None], Ra_new, Ra)
            rn = torch.where(upd, rn_new, rn)
            it_a = it_a + upd.to(torch.int64)
            done_a = done_a | (rn <= thra)
            it += 1

        # ---- check point ----
        improved = rn < best_res
        best_X = torch.where(improved[:, None], Xa, best_X)
        best_res = torch.where(improved, rn, best_res)
        grown = (~done_a) & (rn > best_res * (1 + _GROWTH_TOL) + floor)
        if bool(grown.any()):
            if auto:
                sigma *= 2.0
                increases += 1
                Xa = torch.where(done_a[:, None], Xa, best_X)
                Ra = Ba - op(Xa)
                rn = torch.linalg.vector_norm(Ra, dim=1)
            else:
                warnings.warn(
                    f"solve_neumann: residual grew with scale={sigma:g}; the series diverges "
                    "(scale must exceed λ_max/2 and A + damping I must be positive definite). "
                    "Returning the best iterate.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                diverged = True
        keep = ~done_a
        if not shrink:
            frozen_a = done_a
            all_frozen = bool(frozen_a.all().item())
        elif not bool(keep.all()):
            gone = torch.nonzero(done_a).flatten()
            X[active[gone]] = Xa[gone]
            res[active[gone]] = rn[gone]
            col_iters[active[gone]] = it_a[gone]
            kept = torch.nonzero(keep).flatten()
            active = active[kept]
            frozen_a = frozen_a[kept]
            Ba, thra, Xa, Ra, rn = Ba[kept], thra[kept], Xa[kept], Ra[kept], rn[kept]
            best_X, best_res, it_a, floor = best_X[kept], best_res[kept], it_a[kept], floor[kept]

    if active.numel() > 0:  # not converged: return the best iterate of each column
        better = rn <= best_res
        X[active] = torch.where(better[:, None], Xa, best_X)
        res[active] = torch.where(better, rn, best_res)
        col_iters[active] = it_a

    rel = relative_residual(res, b_norm)
    col_conv = res <= thr
    info.update(
        scale=sigma,
        scale_increases=increases,
        column_iters=from_rows(col_iters, one_d),
        matvec_calls=op.calls,
    )
    return SolveResult(
        x=from_rows(X, one_d),
        iters=int(col_iters.max().item()) if k > 0 else 0,
        residual=from_rows(rel, one_d),
        converged=bool(col_conv.all().item()),
        column_converged=from_rows(col_conv, one_d),
        info=info,
    )
