"""Fused multi-column solver vector updates: ``cg_update_``, ``cg_direction_``,
``neumann_step_`` (formulas: :mod:`metafluence.reference.solvers`, ``csrc/ops.cpp``).

Each is one kernel per iteration for all rows (right-hand sides; for a task-batched solve the
rows are tasks × columns), in place on ``x`` / ``r`` / ``p`` / ``curv_max``, returning only
per-row scalars, so an iterative solver runs with no host synchronisation in the loop.

Backends (:mod:`metafluence.ops._dispatch`): ``native`` (C++ on CPU, CUDA on GPU), ``triton``
and ``reference``. Not differentiable: in-place updates of tensors that require grad raise.

``cg_update`` / ``cg_direction`` are the forms a solver loop calls: they return the updated
tensors, computed in place by a fused kernel when one runs (the inputs are then the outputs)
and out of place by the reference twin otherwise, always so when a gradient flows or a
``torch.func`` transform wraps the inputs. :func:`fused_updates_backend` is the loop's choice of
backend; no solver chooses one itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import _loader
from ..reference import solvers as _reference
from . import _dispatch

__all__ = [
    "cg_direction",
    "cg_direction_",
    "cg_update",
    "cg_update_",
    "fused_backend",
    "fused_updates_backend",
    "neumann_step_",
]

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
OPS = ("cg_update_", "cg_direction_", "neumann_step_")

CHECKS = _dispatch.register_ops(OPS, DTYPES)


def _register_fakes() -> bool:
    if not _loader.STATE.loaded or not all(hasattr(torch.ops.metafluence, op) for op in OPS):
        return False

    @torch.library.register_fake("metafluence::cg_update_")
    def _cg_update_fake(
        x: Tensor,
        r: Tensor,
        curv_max: Tensor,
        p: Tensor,
        Ap: Tensor,
        rz: Tensor,
        active: Tensor,
        curv_tol: float,
    ) -> tuple[Tensor, Tensor]:
        torch._check(x.dim() == 2, lambda: "cg_update_: x must be [k, P]")
        k = x.shape[0]
        return x.new_empty((k,)), x.new_empty((k,), dtype=torch.bool)

    @torch.library.register_fake("metafluence::cg_direction_")
    def _cg_direction_fake(
        p: Tensor, z: Tensor, rz_new: Tensor, rz_old: Tensor, active: Tensor
    ) -> None:
        torch._check(p.dim() == 2, lambda: "cg_direction_: p must be [k, P]")

    @torch.library.register_fake("metafluence::neumann_step_")
    def _neumann_step_fake(
        x: Tensor,
        r: Tensor,
        b: Tensor,
        Ax: Tensor,
        active: Tensor,
        thr: Tensor,
        inv_sigma: float,
        advance: bool,
    ) -> Tensor:
        torch._check(x.dim() == 2, lambda: "neumann_step_: x must be [k, P]")
        return x.new_empty((x.shape[0],))

    return True


NATIVE_REGISTERED = _register_fakes()


# ---- validation ----------------------------------------------------------------------------
def _validate(op: str, rows: dict[str, Any], vecs: dict[str, Any], active: Any) -> Tensor:
    first = next(iter(rows))
    ref = rows[first]
    if not isinstance(ref, Tensor):
        raise TypeError(f"{op}: {first} must be a torch.Tensor [k, P], got {type(ref).__name__}")
    if ref.dim() != 2:
        raise ValueError(
            f"{op}: {first} has {ref.dim()} dims (shape {list(ref.shape)}), expected [k, P]"
        )
    if not ref.dtype.is_floating_point:
        raise TypeError(f"{op}: {first} has dtype {ref.dtype}, expected a floating dtype")
    k = ref.shape[0]
    for name, t in list(rows.items())[1:]:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor [k, P], got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(
                f"{op}: {name} has shape {list(t.shape)}, expected {list(ref.shape)} like {first}"
            )
    for name, t in [*vecs.items(), ("active", active)]:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor [k], got {type(t).__name__}")
        if tuple(t.shape) != (k,):
            raise ValueError(f"{op}: {name} has shape {list(t.shape)}, expected [{k}]")
    if active.dtype != torch.bool:
        raise TypeError(f"{op}: active has dtype {active.dtype}, expected torch.bool")
    for name, t in [*rows.items(), *vecs.items(), ("active", active)]:
        if t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first} is on {ref.device}; "
                "expected the same device"
            )
        if name != "active" and t.dtype != ref.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype} but {first} has {ref.dtype}; "
                "expected the same dtype"
            )
    return ref


def _choose(op: str, ref: Tensor, backend: str | None) -> str:
    return _dispatch.select_backend(op, CHECKS[op], ref.device, ref.dtype, backend=backend)


def fused_backend(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
    """The backend the three ops would use for ``device`` / ``dtype`` (all three share it)."""
    return _dispatch.select_backend("cg_update_", CHECKS["cg_update_"], device, dtype, backend)


def fused_updates_backend(b: Tensor, fused: bool | None = None) -> str | None:
    """The backend of the fused vector updates for a solve with right-hand sides ``b``:
    ``"native"`` or ``"triton"`` when one runs for ``b``'s device and dtype, ``None`` for the
    plain-PyTorch loop (the reference twins): with ``fused=False``, when ``b`` requires grad or is
    wrapped by a ``torch.func`` transform (the fused updates are in place and not
    differentiable), with ``METAFLUENCE_BACKEND=reference``, and when a forced backend cannot
    run here (the loop then falls back instead of raising)."""
    if fused is False or _differentiable(b):
        return None
    try:
        chosen = fused_backend(b.device, b.dtype)
    except RuntimeError:  # a forced backend that cannot run here: use the plain loop
        return None
    return chosen if chosen in ("native", "triton") else None


def _differentiable(*tensors: Tensor) -> bool:
    """True if a gradient may flow through ``tensors`` (autograd or a ``torch.func`` wrapper)."""
    return any(
        t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors
    )


def _with_contiguous(mutated: list[Tensor], fn: Callable[[list[Tensor]], Any]) -> Any:
    """Run ``fn`` on contiguous working copies of ``mutated`` and copy results back."""
    work = [t if t.is_contiguous() else t.contiguous() for t in mutated]
    out = fn(work)
    for t, w in zip(mutated, work, strict=True):
        if w is not t:
            t.copy_(w)
    return out


# ---- entry points -----------------------------------------------------------------------------
def cg_update_(
    x: Tensor,
    r: Tensor,
    curv_max: Tensor,
    p: Tensor,
    Ap: Tensor,
    rz: Tensor,
    active: Tensor,
    curv_tol: float,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One multi-column CG step, in place on ``x``, ``r``, ``curv_max``.

    Per active row: ``pAp = pᵀAp``, ``curv = pAp / max(pᵀp, tiny)``,
    ``curv_max ← max(curv_max, |curv|)``, ``neg = curv <= curv_tol · curv_max``; rows that are
    not ``neg`` step with ``alpha = rz / pAp``: ``x ← x + alpha p``, ``r ← r − alpha Ap``.

    Args:
        x, r, p, Ap: ``[k, P]`` (float32 / float64, one device).
        curv_max, rz: ``[k]``, same dtype; active: ``[k]`` bool (inactive rows untouched).
        curv_tol: relative negative-curvature threshold.
        backend: ``"native"``, ``"triton"``, ``"reference"`` or ``None`` (automatic).

    Returns:
        ``rr`` ``[k]`` (``rᵀr`` after the step, 0 for rows that did not step) and ``neg`` ``[k]``
        bool.
    """
    ref = _validate(
        "cg_update_", {"x": x, "r": r, "p": p, "Ap": Ap}, {"curv_max": curv_max, "rz": rz}, active
    )
    chosen = _choose("cg_update_", ref, backend)
    if chosen == "native":
        out = torch.ops.metafluence.cg_update_(x, r, curv_max, p, Ap, rz, active, float(curv_tol))
        return out[0], out[1]
    if chosen == "triton":
        from ..kernels.triton.solver_update import cg_update_ as tri

        return _with_contiguous(
            [x, r, curv_max], lambda w: tri(w[0], w[1], w[2], p, Ap, rz, active, curv_tol)
        )
    return _reference.cg_update_(x, r, curv_max, p, Ap, rz, active, curv_tol)


def cg_direction_(
    p: Tensor,
    z: Tensor,
    rz_new: Tensor,
    rz_old: Tensor,
    active: Tensor,
    *,
    backend: str | None = None,
) -> None:
    r"""New CG directions, in place on ``p``: per active row
    ``beta = rz_new / rz_old`` (``rz_old = 0`` read as 1), ``p ← z + beta p``.

    Args:
        p, z: ``[k, P]``; rz_new, rz_old: ``[k]``; active: ``[k]`` bool; backend: as
            :func:`cg_update_`.
    """
    ref = _validate("cg_direction_", {"p": p, "z": z}, {"rz_new": rz_new, "rz_old": rz_old}, active)
    chosen = _choose("cg_direction_", ref, backend)
    if chosen == "native":
        torch.ops.metafluence.cg_direction_(p, z, rz_new, rz_old, active)
    elif chosen == "triton":
        from ..kernels.triton.solver_update import cg_direction_ as tri

        _with_contiguous([p], lambda w: tri(w[0], z, rz_new, rz_old, active))
    else:
        _reference.cg_direction_(p, z, rz_new, rz_old, active)


def neumann_step_(
    x: Tensor,
    r: Tensor,
    b: Tensor,
    Ax: Tensor,
    active: Tensor,
    thr: Tensor,
    inv_sigma: float,
    advance: bool,
    *,
    backend: str | None = None,
) -> Tensor:
    r"""Neumann (LiSSA) residual and step, in place on ``r`` and ``x``.

    Per active row: ``r ← b − Ax``, ``rn = ‖r‖``; if ``advance`` and not ``rn <= thr``:
    ``x ← x + r/σ`` (``inv_sigma = 1/σ``), i.e. ``x ← b/σ + x − Ax/σ``.

    Args:
        x, r, b, Ax: ``[k, P]``; active: ``[k]`` bool; thr: ``[k]`` stopping thresholds;
        inv_sigma: ``1/σ``; advance: take the step; backend: as :func:`cg_update_`.

    Returns:
        ``rn`` ``[k]`` (0 for inactive rows).
    """
    ref = _validate("neumann_step_", {"x": x, "r": r, "b": b, "Ax": Ax}, {"thr": thr}, active)
    chosen = _choose("neumann_step_", ref, backend)
    if chosen == "native":
        out: Tensor = torch.ops.metafluence.neumann_step_(
            x, r, b, Ax, active, thr, float(inv_sigma), bool(advance)
        )
        return out
    if chosen == "triton":
        from ..kernels.triton.solver_update import neumann_step_ as tri

        return _with_contiguous(
            [x, r], lambda w: tri(w[0], w[1], b, Ax, active, thr, inv_sigma, advance)
        )
    return _reference.neumann_step_(x, r, b, Ax, active, thr, inv_sigma, advance)


def cg_update(
    x: Tensor,
    r: Tensor,
    curv_max: Tensor,
    p: Tensor,
    Ap: Tensor,
    rz: Tensor,
    active: Tensor,
    curv_tol: float,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r""":func:`cg_update_` for a solver loop: returns ``(x, r, curv_max, rr, neg)``.

    A fused backend updates ``x``, ``r``, ``curv_max`` in place and returns them; the reference
    twin (:func:`metafluence.reference.solvers.cg_update`, out of place) runs for
    ``backend="reference"`` and whenever a gradient may flow through the inputs.
    """
    if backend == "reference" or _differentiable(x, r, p, Ap, rz):
        _validate(
            "cg_update_",
            {"x": x, "r": r, "p": p, "Ap": Ap},
            {"curv_max": curv_max, "rz": rz},
            active,
        )
        return _reference.cg_update(x, r, curv_max, p, Ap, rz, active, curv_tol)
    rr, neg = cg_update_(x, r, curv_max, p, Ap, rz, active, curv_tol, backend=backend)
    return x, r, curv_max, rr, neg


def cg_direction(
    p: Tensor,
    z: Tensor,
    rz_new: Tensor,
    rz_old: Tensor,
    active: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    r""":func:`cg_direction_` for a solver loop: returns the new ``p`` (``z + beta p`` on active
    rows), in place with a fused backend, out of place by the reference twin for
    ``backend="reference"`` and whenever a gradient may flow through the inputs."""
    if backend == "reference" or _differentiable(p, z, rz_new, rz_old):
        _validate("cg_direction_", {"p": p, "z": z}, {"rz_new": rz_new, "rz_old": rz_old}, active)
        return _reference.cg_direction(p, z, rz_new, rz_old, active)
    cg_direction_(p, z, rz_new, rz_old, active, backend=backend)
    return p
