"""Reference twins of the fused solver vector updates (``cg_update_``, ``cg_direction_``,
``neumann_step_``): plain PyTorch, same signatures, same in-place semantics. ``cg_update`` and
``cg_direction`` are the out-of-place forms (differentiable, safe under ``torch.func``): the
plain-PyTorch CG loop of :func:`metafluence.solvers.solve_cg` runs on them.

Rows are right-hand sides (for a task-batched solve: tasks × columns): ``x, r, p, Ap, b, Ax, z``
are ``[k, P]``; ``rz, rz_new, rz_old, curv_max, thr`` are ``[k]`` in the same dtype; ``active``
is ``[k]`` bool. Rows with ``active == False`` are never written.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cg_direction",
    "cg_direction_",
    "cg_update",
    "cg_update_",
    "neumann_step_",
]


def cg_update(
    x: Tensor,
    r: Tensor,
    curv_max: Tensor,
    p: Tensor,
    Ap: Tensor,
    rz: Tensor,
    active: Tensor,
    curv_tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""One CG step on every active row, out of place (differentiable, ``torch.func``-safe).

    ``pAp = pᵀAp``, ``pp = pᵀp``, ``curv = pAp / max(pp, tiny)``,
    ``curv_max ← max(curv_max, |curv|)``, ``neg = curv <= curv_tol · curv_max`` (non-positive
    curvature: the row does not step), ``alpha = rz / pAp``, ``x ← x + alpha p``,
    ``r ← r − alpha Ap``.

    Returns:
        ``(x, r, curv_max, rr, neg)``: the new ``x``, ``r``, ``curv_max``; ``rr`` ``[k]``
        (``rᵀr`` after the step, 0 for rows that did not step) and ``neg`` ``[k]`` bool (False
        for inactive rows).
    """
    dt = x.dtype
    pap = (p * Ap).sum(dim=1)
    pp = (p * p).sum(dim=1)
    curv = pap / pp.clamp_min(torch.finfo(dt).tiny)
    curv_max = torch.where(active, torch.maximum(curv_max, curv.abs()), curv_max)
    neg = active & (curv <= curv_tol * curv_max)
    step = active & ~neg
    alpha = torch.where(step, rz / torch.where(step, pap, torch.ones_like(pap)), 0.0)
    x = torch.where(step[:, None], x + alpha[:, None] * p, x)
    r = torch.where(step[:, None], r - alpha[:, None] * Ap, r)
    rr = torch.where(step, (r * r).sum(dim=1), 0.0)
    return x, r, curv_max, rr, neg


def cg_update_(
    x: Tensor,
    r: Tensor,
    curv_max: Tensor,
    p: Tensor,
    Ap: Tensor,
    rz: Tensor,
    active: Tensor,
    curv_tol: float,
) -> tuple[Tensor, Tensor]:
    r""":func:`cg_update` in place on ``x``, ``r``, ``curv_max``; returns ``(rr, neg)``."""
    x_new, r_new, cm_new, rr, neg = cg_update(x, r, curv_max, p, Ap, rz, active, curv_tol)
    x.copy_(x_new)
    r.copy_(r_new)
    curv_max.copy_(cm_new)
    return rr, neg


def cg_direction(p: Tensor, z: Tensor, rz_new: Tensor, rz_old: Tensor, active: Tensor) -> Tensor:
    r"""New CG directions on every active row, out of place:
    ``beta = rz_new / rz_old`` (``rz_old = 0`` read as 1), ``p ← z + beta p``."""
    beta = rz_new / torch.where(rz_old == 0, torch.ones_like(rz_old), rz_old)
    return torch.where(active[:, None], z + beta[:, None] * p, p)


def cg_direction_(p: Tensor, z: Tensor, rz_new: Tensor, rz_old: Tensor, active: Tensor) -> None:
    r""":func:`cg_direction` in place on ``p``."""
    p.copy_(cg_direction(p, z, rz_new, rz_old, active))


def neumann_step_(
    x: Tensor,
    r: Tensor,
    b: Tensor,
    Ax: Tensor,
    active: Tensor,
    thr: Tensor,
    inv_sigma: float,
    advance: bool,
) -> Tensor:
    r"""Neumann (LiSSA) residual and step on every active row, in place.

    ``r ← b − Ax``, ``rn = ‖r‖``; then, if ``advance`` and not ``rn <= thr``:
    ``x ← x + r / σ`` (``= b/σ + x − Ax/σ``, with ``inv_sigma = 1/σ``).

    Returns:
        ``rn`` ``[k]`` (0 for inactive rows).
    """
    r_new = b - Ax
    r.copy_(torch.where(active[:, None], r_new, r))
    rn = torch.where(active, torch.linalg.vector_norm(r_new, dim=1), 0.0)
    if advance:
        adv = active & ~(rn <= thr)
        x.copy_(torch.where(adv[:, None], x + inv_sigma * r, x))
    return rn
