"""Drop-in replacements for dattri's ``dattri.func.hessian.ihvp_*`` functions (dattri 0.3.0).

Same argument names, defaults and return conventions as dattri, so an attributor can swap the
import::

    # from dattri.func.hessian import ihvp_cg
    from metafluence.integrations.dattri import ihvp_cg

    ihvp = ihvp_cg(loss_func, argnums=0, max_iter=50, tol=1e-7, regularization=1e-3)
    x = ihvp((params, inputs, labels), v)  # v: [P] or [k, P] -> [k, P] (always 2-D, like dattri)

Differences, all in the user's favour:

* The ``k`` right-hand sides are solved by one batched solver (:func:`metafluence.solvers.solve_cg`
  and friends): one Hessian-vector pass per iteration serves every still-active column.
* ``tol`` is honoured **per column** (dattri's vmapped CG ignores it and always runs ``max_iter``
  iterations): column ``j`` stops as soon as ``||v_j - (H + reg I) x_j|| <= tol``.
* :func:`ihvp_lissa` runs the LiSSA recursion deterministically on the expected mini-batch Hessian
  (the average of the Hessians of the consecutive ``batch_size`` chunks of ``x``), i.e. the
  quantity dattri's stochastic recursion estimates; it stops early at ``tol``.
* :func:`ihvp_dataset_cg` inverts the Hessian of the whole dataset (accumulated over a loader)
  once, instead of summing per-batch inverses (dattri PR #241).

Conventions kept from dattri: ``func(*x)`` returns a scalar, the Hessian is taken with respect to
``x[argnums]`` (a flat parameter vector ``[P]``), ``v`` is ``[P]`` or ``[k, P]`` and the result is
``[k, P]``; CG starts from ``x0 = v`` as dattri's does; ``regularization`` adds
``regularization · v`` to each Hessian-vector product; LiSSA returns
``(H + damping · scaling · I)⁻¹ v`` (the fixed point of dattri's recursion).

This module does not import dattri.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..solvers import SolveResult, solve_arnoldi, solve_cg, solve_neumann

__all__ = [
    "hvp_at_x",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_dataset_cg",
    "ihvp_lissa",
]

_MODES = ("rev-rev", "rev-fwd")


def hvp_at_x(
    func: Callable[..., Tensor],
    x: tuple[Any, ...],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """Batched Hessian-vector product of ``func`` at ``x`` w.r.t. ``x[argnums]``.

    Returns ``matvec(V)`` for ``V`` of shape ``[P]`` or ``[k, P]`` (rows), one linearisation
    shared by all rows (``rev-rev``: VJP of the gradient; ``rev-fwd``: JVP of the gradient),
    plus ``regularization · V`` (dattri's ``hvp_at_x`` argument names).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    x = tuple(x)
    if not 0 <= argnums < len(x):
        raise ValueError(f"argnums={argnums} out of range for {len(x)} arguments")
    p = x[argnums].detach()

    def f(p_: Tensor) -> Tensor:
        args = list(x)
        args[argnums] = p_
        return func(*args)

    g = torch.func.grad(f)
    if mode == "rev-rev":
        _, vjp_fn = torch.func.vjp(g, p)

        def one(v: Tensor) -> Tensor:
            return vjp_fn(v)[0]

    else:

        def one(v: Tensor) -> Tensor:
            return torch.func.jvp(g, (p,), (v,))[1]

    batched = torch.func.vmap(one)

    def matvec(v: Tensor) -> Tensor:
        out = one(v) if v.dim() == 1 else batched(v)
        return out + regularization * v if regularization else out

    return matvec


def _rows(v: Tensor) -> Tensor:
    return v.unsqueeze(0) if v.dim() == 1 else v


def ihvp_at_x_cg(
    func: Callable,
    *x,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
    return_result: bool = False,
) -> Callable[[Tensor], Tensor]:
    """dattri's ``ihvp_at_x_cg``: ``v [P] or [k, P] -> (H + regularization I)⁻¹ v`` as ``[k, P]``.

    Batched CG from ``x0 = v`` (as dattri), at most ``max_iter`` iterations; column ``j`` stops
    when ``||v_j - (H + reg I) x_j|| <= tol``. With ``return_result=True`` the returned function
    gives the :class:`~metafluence.solvers.SolveResult` (per-column residuals and convergence).
    """
    hvp = hvp_at_x(func, x, argnums=argnums, mode=mode)

    def _ihvp(v: Tensor) -> Tensor | SolveResult:
        b = _rows(v).detach()
        res = solve_cg(
            hvp, b, damping=regularization, rtol=0.0, atol=tol, maxiter=max_iter, x0=b.clone()
        )
        return res if return_result else res.x

    return _ihvp


def ihvp_cg(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[tuple[Tensor, ...], Tensor], Tensor]:
    """dattri's ``ihvp_cg``: returns ``f(x, v)`` computing ``(H(x) + reg I)⁻¹ v`` (``[k, P]``),
    backed by the batched :func:`~metafluence.solvers.solve_cg` (per-column ``tol``)."""

    def _ihvp_cg_func(x: tuple[Tensor, ...], v: Tensor) -> Tensor:
        return ihvp_at_x_cg(
            func,
            *x,
            argnums=argnums,
            max_iter=max_iter,
            tol=tol,
            mode=mode,
            regularization=regularization,
        )(v)

    return _ihvp_cg_func


def ihvp_at_x_arnoldi(
    func: Callable,
    *x,
    argnums: int = 0,
    max_iter: int = 100,
    top_k: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """dattri's ``ihvp_at_x_arnoldi``: ``v -> U diag(1/(λ + reg)) Uᵀ v`` on the ``top_k`` Ritz
    pairs (largest ``|λ|``) of a Krylov space of ``min(max_iter - 1, P)`` vectors, backed by
    :func:`~metafluence.solvers.solve_arnoldi`. ``norm_constant`` and ``tol`` (dattri's Krylov
    breakdown threshold) are accepted for compatibility; the Lanczos basis is fully
    re-orthogonalised, so neither is needed."""
    del norm_constant, tol
    hvp = hvp_at_x(func, x, argnums=argnums, mode=mode)

    def _ihvp(v: Tensor) -> Tensor:
        b = _rows(v).detach()
        P = b.shape[1]
        iters = max(1, min(max_iter - 1, P))
        rank = max(1, min(top_k, iters))
        return solve_arnoldi(hvp, b, damping=regularization, rank=rank, iters=iters).x

    return _ihvp


def ihvp_arnoldi(
    func: Callable,
    argnums: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
) -> Callable[[tuple[Tensor, ...], Tensor], Tensor]:
    """dattri's ``ihvp_arnoldi`` (``top_k = 100`` as in dattri), backed by
    :func:`~metafluence.solvers.solve_arnoldi`."""

    def _ihvp_arnoldi_func(x: tuple[Tensor, ...], v: Tensor) -> Tensor:
        return ihvp_at_x_arnoldi(
            func,
            *x,
            argnums=argnums,
            max_iter=max_iter,
            tol=tol,
            mode=mode,
            regularization=regularization,
        )(v)

    return _ihvp_arnoldi_func


def _expected_batch_hvp(
    func: Callable,
    x: tuple[Tensor, ...],
    argnums: int,
    in_dims: tuple[int | None, ...] | None,
    batch_size: int,
    mode: str,
) -> Callable[[Tensor], Tensor]:
    """HVP of the expected mini-batch Hessian: consecutive ``batch_size`` chunks of the data
    arguments (split along ``in_dims``, default 0 for every argument, like dattri), each chunk
    weighted by ``|chunk| / n`` (exact for mean-reduced losses, and for sum-reduced ones when
    ``batch_size`` divides ``n``)."""
    if in_dims is None:
        in_dims = (0,) * len(x)
    if len(in_dims) != len(x):
        raise ValueError("length of `in_dims` mismatches length of `x`")
    sizes = {xi.shape[d] for xi, d in zip(x, in_dims, strict=True) if d is not None}
    if len(sizes) > 1:
        raise ValueError(f"input batch size mismatch: {sorted(sizes)}")
    n = sizes.pop() if sizes else 1
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        part = tuple(
            xi.narrow(d, start, stop - start) if d is not None else xi
            for xi, d in zip(x, in_dims, strict=True)
        )
        chunks.append(((stop - start) / n, hvp_at_x(func, part, argnums=argnums, mode=mode)))

    def matvec(v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        for w, hv in chunks:
            out = out + w * hv(v)
        return out

    return matvec


def ihvp_at_x_lissa(
    func: Callable,
    *x,
    in_dims: tuple[int | None, ...] | None = None,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable | None = None,
    mode: str = "rev-rev",
    tol: float = 1e-7,
) -> Callable[[Tensor], Tensor]:
    """dattri's ``ihvp_at_x_lissa``, deterministic: the Neumann/LiSSA recursion
    ``y ← y + (v - (H + damping·scaling I) y) / scaling`` on the expected mini-batch Hessian
    (:func:`~metafluence.solvers.solve_neumann` with ``scale=scaling``), at most
    ``recursion_depth`` steps, each column stopping once its relative residual is ``<= tol``.
    ``num_repeat`` is accepted for compatibility (a deterministic recursion needs no repeats).
    ``collate_fn`` is applied to each chunk before ``func`` (as dattri does to a sampled batch)."""
    del num_repeat
    if collate_fn is not None:
        inner = func

        def func(*args):  # noqa: F811 - wrap func so that chunks are collated first
            return inner(*collate_fn(args))

    hvp = _expected_batch_hvp(func, tuple(x), argnums, in_dims, batch_size, mode)

    def _ihvp(v: Tensor) -> Tensor:
        b = _rows(v).detach()
        return solve_neumann(
            hvp,
            b,
            damping=damping * scaling,
            scale=scaling,
            maxiter=recursion_depth,
            rtol=tol,
        ).x

    return _ihvp


def ihvp_lissa(
    func: Callable,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable | None = None,
    mode: str = "rev-rev",
) -> Callable[..., Tensor]:
    """dattri's ``ihvp_lissa``: returns ``f(x, v, in_dims=None)`` computing
    ``(H + damping·scaling I)⁻¹ v`` (``[k, P]``) by the deterministic LiSSA recursion of
    :func:`ihvp_at_x_lissa`. As in dattri, ``x`` holds every argument of ``func`` (parameters
    included; give them ``in_dims`` ``None``) and the Hessian is taken w.r.t. ``x[argnums]``."""

    def _ihvp_lissa_func(
        x: tuple[Tensor, ...], v: Tensor, in_dims: tuple[int | None, ...] | None = None
    ) -> Tensor:
        return ihvp_at_x_lissa(
            func,
            *x,
            in_dims=in_dims,
            argnums=argnums,
            batch_size=batch_size,
            recursion_depth=recursion_depth,
            damping=damping,
            scaling=scaling,
            collate_fn=collate_fn,
            mode=mode,
        )(v)

    return _ihvp_lissa_func


def ihvp_dataset_cg(
    func: Callable,
    params: Tensor,
    loader: Iterable[Any],
    v: Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-7,
    regularization: float = 0.0,
    mode: str = "rev-rev",
    reduction: str = "mean",
    return_result: bool = False,
    rtol: float = 0.0,
) -> Tensor | SolveResult:
    """``(H_D + regularization I)⁻¹ v`` for the Hessian of the **whole dataset** ``D``.

    ``func(params, batch)`` (or ``func(params, *batch)`` when a batch is a tuple / list, as a
    ``DataLoader`` of a ``TensorDataset`` yields) is the loss of one batch. The operator is
    accumulated over ``loader`` inside every matvec::

        H_D v = Σ_b w_b H_b v,   w_b = |b| / n  (reduction="mean": func is a batch mean)
                                 w_b = 1        (reduction="sum":  func is a batch sum)

    and inverted **once** by batched CG from ``x0 = 0``, unlike summing per-batch inverses
    ``Σ_b H_b⁻¹ v`` (dattri PR #241). Column ``j`` stops when
    ``‖v_j − (H_D + reg I) x_j‖ ≤ max(tol, rtol · ‖v_j‖)`` (``tol`` absolute as in dattri,
    ``rtol`` relative to the right-hand side; either may be 0). ``v``: ``[P]`` or
    ``[k, P]``; returns ``[k, P]`` (or the ``SolveResult`` with ``return_result=True``). ``loader``
    is iterated once per CG iteration (it must be re-iterable: a list or a ``DataLoader``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    params = params.detach()

    def _size(batch: Any) -> int:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() > 0 else 1

    def _args(batch: Any) -> tuple[Any, ...]:
        return (params, *batch) if isinstance(batch, (tuple, list)) else (params, batch)

    n = sum(_size(batch) for batch in loader) if reduction == "mean" else 1

    def matvec(V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        for batch in loader:
            w = _size(batch) / n if reduction == "mean" else 1.0
            out = out + w * hvp_at_x(func, _args(batch), argnums=0, mode=mode)(V)
        return out

    b = _rows(v).detach()
    res = solve_cg(matvec, b, damping=regularization, rtol=rtol, atol=tol, maxiter=max_iter)
    return res if return_result else res.x
