"""Triton kernels for the fused solver vector updates (``cg_update_``, ``cg_direction_``,
``neumann_step_``; formulas in :mod:`metafluence.reference.solvers`).

One program per row: a loop over ``P`` in ``BLOCK`` chunks for the reductions, the per-row scalar
logic, then the update loop. Accumulation in the input precision. Inputs are validated by
:mod:`metafluence.ops.solver_update`; mutated tensors must be contiguous there (the op entry
passes contiguous working copies and copies back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _cg_update_kernel(
    x_ptr,
    r_ptr,
    cmax_ptr,
    p_ptr,
    ap_ptr,
    rz_ptr,
    act_ptr,
    rr_ptr,
    neg_ptr,
    P,
    curv_tol,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * P
    offs = tl.arange(0, BLOCK)
    act = tl.load(act_ptr + row)
    dt = x_ptr.dtype.element_ty
    if act != 0:
        s_pap = tl.zeros((BLOCK,), dtype=dt)
        s_pp = tl.zeros((BLOCK,), dtype=dt)
        for j0 in range(0, P, BLOCK):
            m = j0 + offs < P
            pv = tl.load(p_ptr + base + j0 + offs, mask=m, other=0.0)
            av = tl.load(ap_ptr + base + j0 + offs, mask=m, other=0.0)
            s_pap += pv * av
            s_pp += pv * pv
        pap = tl.sum(s_pap, axis=0)
        pp = tl.sum(s_pp, axis=0)
        curv = pap / tl.where(pp > 0, pp, 1.0)
        old = tl.load(cmax_ptr + row)
        cm = tl.where((old != old) | (curv != curv), old + curv, tl.maximum(old, tl.abs(curv)))
        tl.store(cmax_ptr + row, cm)
        is_neg = curv <= curv_tol * cm
        tl.store(neg_ptr + row, is_neg.to(tl.int8))
        if is_neg:
            tl.store(rr_ptr + row, 0.0)
        else:
            a = tl.load(rz_ptr + row) / pap
            acc = tl.zeros((BLOCK,), dtype=dt)
            for j0 in range(0, P, BLOCK):
                m = j0 + offs < P
                pv = tl.load(p_ptr + base + j0 + offs, mask=m, other=0.0)
                av = tl.load(ap_ptr + base + j0 + offs, mask=m, other=0.0)
                xv = tl.load(x_ptr + base + j0 + offs, mask=m, other=0.0)
                rv = tl.load(r_ptr + base + j0 + offs, mask=m, other=0.0)
                xv = xv + a * pv
                rv = rv - a * av
                tl.store(x_ptr + base + j0 + offs, xv, mask=m)
                tl.store(r_ptr + base + j0 + offs, rv, mask=m)
                acc += rv * rv
            tl.store(rr_ptr + row, tl.sum(acc, axis=0))
    else:
        tl.store(rr_ptr + row, 0.0)
        tl.store(neg_ptr + row, tl.zeros((), dtype=tl.int8))


@triton.jit
def _cg_direction_kernel(p_ptr, z_ptr, new_ptr, old_ptr, act_ptr, P, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    act = tl.load(act_ptr + row)
    if act != 0:
        base = row * P
        offs = tl.arange(0, BLOCK)
        old = tl.load(old_ptr + row)
        beta = tl.load(new_ptr + row) / tl.where(old == 0, 1.0, old)
        for j0 in range(0, P, BLOCK):
            m = j0 + offs < P
            pv = tl.load(p_ptr + base + j0 + offs, mask=m, other=0.0)
            zv = tl.load(z_ptr + base + j0 + offs, mask=m, other=0.0)
            tl.store(p_ptr + base + j0 + offs, zv + beta * pv, mask=m)


@triton.jit
def _neumann_step_kernel(
    x_ptr,
    r_ptr,
    b_ptr,
    ax_ptr,
    act_ptr,
    thr_ptr,
    rn_ptr,
    P,
    inv_sigma_ptr,
    ADVANCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    act = tl.load(act_ptr + row)
    dt = x_ptr.dtype.element_ty
    if act != 0:
        base = row * P
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=dt)
        for j0 in range(0, P, BLOCK):
            m = j0 + offs < P
            bv = tl.load(b_ptr + base + j0 + offs, mask=m, other=0.0)
            av = tl.load(ax_ptr + base + j0 + offs, mask=m, other=0.0)
            rv = bv - av
            tl.store(r_ptr + base + j0 + offs, rv, mask=m)
            acc += rv * rv
        rn = tl.sqrt(tl.sum(acc, axis=0))
        tl.store(rn_ptr + row, rn)
        if ADVANCE:
            thr = tl.load(thr_ptr + row)
            if not (rn <= thr):
                s = tl.load(inv_sigma_ptr)
                for j0 in range(0, P, BLOCK):
                    m = j0 + offs < P
                    # r is re-read from memory: same program wrote it above
                    rv = tl.load(r_ptr + base + j0 + offs, mask=m, other=0.0)
                    xv = tl.load(x_ptr + base + j0 + offs, mask=m, other=0.0)
                    tl.store(x_ptr + base + j0 + offs, xv + s * rv, mask=m)
    else:
        tl.store(rn_ptr + row, 0.0)


def _block(P: int) -> int:
    return max(16, min(BLOCK, triton.next_power_of_2(max(P, 1))))


def cg_update_(
    x: torch.Tensor,
    r: torch.Tensor,
    curv_max: torch.Tensor,
    p: torch.Tensor,
    Ap: torch.Tensor,
    rz: torch.Tensor,
    active: torch.Tensor,
    curv_tol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``cg_update_`` (``x``, ``r``, ``curv_max`` contiguous, updated in place)."""
    k, P = x.shape
    rr = torch.empty(k, dtype=x.dtype, device=x.device)
    neg = torch.empty(k, dtype=torch.int8, device=x.device)
    if k > 0:
        _cg_update_kernel[(k,)](
            x,
            r,
            curv_max,
            p.contiguous(),
            Ap.contiguous(),
            rz.contiguous(),
            active.contiguous().to(torch.int8),
            rr,
            neg,
            P,
            float(curv_tol),
            BLOCK=_block(P),
        )
    return rr, neg.bool()


def cg_direction_(
    p: torch.Tensor,
    z: torch.Tensor,
    rz_new: torch.Tensor,
    rz_old: torch.Tensor,
    active: torch.Tensor,
) -> None:
    """Triton ``cg_direction_`` (``p`` contiguous, updated in place)."""
    k, P = p.shape
    if k == 0 or P == 0:
        return
    _cg_direction_kernel[(k,)](
        p,
        z.contiguous(),
        rz_new.contiguous(),
        rz_old.contiguous(),
        active.contiguous().to(torch.int8),
        P,
        BLOCK=_block(P),
    )


def neumann_step_(
    x: torch.Tensor,
    r: torch.Tensor,
    b: torch.Tensor,
    Ax: torch.Tensor,
    active: torch.Tensor,
    thr: torch.Tensor,
    inv_sigma: float,
    advance: bool,
) -> torch.Tensor:
    """Triton ``neumann_step_`` (``x``, ``r`` contiguous, updated in place)."""
    k, P = x.shape
    rn = torch.empty(k, dtype=x.dtype, device=x.device)
    if k > 0:
        _neumann_step_kernel[(k,)](
            x,
            r,
            b.contiguous(),
            Ax.contiguous(),
            active.contiguous().to(torch.int8),
            thr.contiguous(),
            rn,
            P,
            torch.full((1,), float(inv_sigma), dtype=x.dtype, device=x.device),
            ADVANCE=bool(advance),
            BLOCK=_block(P),
        )
    return rn
