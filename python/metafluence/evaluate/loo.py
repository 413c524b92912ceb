"""Ground truth by retraining: leave-one-out and the proximal response (math.md §5).

For each item ``e`` the item's weight is set to 0 (a task's ``c_k``, a support point's
``w_kj``, a query point's ``v_kq``; the other weights are unchanged, as in the influence
derivation), the meta-parameters are retrained, and the true change of the target
``Δf_{-e} = f(λ*_{-e}) − f(λ*)`` is recorded: the quantity that ``removal_effect`` predicts.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._store import ProgressStore, digest, map_chunks
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..data.source import TaskSource
from ..data.tasks import Task, TaskBatch
from ..influence.removal import ITEMS, TargetLike, target_value
from ..train._bar import progress_bar
from ..train.meta_train import newton_refine

Retrain = Callable[[TaskBatch | TaskSource, dict[str, Tensor]], dict[str, Tensor]]


def item_index(batch: TaskBatch | TaskSource, items: str) -> list[Any]:
    """All items of a kind: task positions ``k`` or ``(k, j)`` pairs."""
    if items == "task":
        return list(range(batch.num_tasks))
    size = batch.n_support if items == "support_point" else batch.n_query
    return [(k, j) for k in range(batch.num_tasks) for j in range(size)]


def reweighted(
    batch: TaskBatch | TaskSource, items: str, item: Any, factor: float
) -> TaskBatch | TaskSource:
    """``batch`` with one item's weight multiplied by ``factor`` (0 = removal)."""
    return batch.reweighted({items: [item]}, factor)


def _two_arg(retrain: Callable[..., dict[str, Tensor]]) -> Retrain:
    """Accept ``retrain(batch)`` (api.md) as well as ``retrain(batch, start_params)``."""
    try:
        params = [
            p
            for p in inspect.signature(retrain).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        takes_one = len(params) == 1 and not any(
            p.kind == p.VAR_POSITIONAL for p in inspect.signature(retrain).parameters.values()
        )
    except (TypeError, ValueError):
        takes_one = False
    if takes_one:
        return lambda batch, start: retrain(batch)
    return retrain


def newton_retrain(
    problem: MetaProblem, tol: float = 1e-12, max_steps: int = 30, proximal: float = 0.0
) -> Retrain:
    """Retrainer: dense Newton from the given start (``proximal=δ'`` adds ``δ'/2‖λ−λ*‖²``)."""

    def retrain(batch: TaskBatch | TaskSource, start: dict[str, Tensor]) -> dict[str, Tensor]:
        prox = None
        if proximal > 0:
            prox = (float(proximal), problem.flat(start))
        return newton_refine(problem, start, batch, tol=tol, max_steps=max_steps, prox=prox)

    return retrain


def leave_one_out(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike,
    items: str = "task",
    retrain: Retrain | Callable[[TaskBatch], dict[str, Tensor]] | None = None,
    indices: Sequence[Any] | None = None,
    factor: float = 0.0,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    chunk_size: int = 1,
    details: list[dict[str, Any]] | None = None,
    stationary_tol: float = 1e-6,
) -> Tensor:
    """True ``Δf`` for each item in ``indices`` (default: all items of the kind) ``[len]``.

    ``retrain(batch, start_params) -> params`` (or ``retrain(batch)``) retrains on the
    reweighted batch (a :class:`TaskBatch` whose weights encode the removal); the default
    is :func:`newton_retrain` (warm start at ``λ*``, dense Newton: small ``P`` only). Pass a
    ``retrain`` that ignores ``start_params`` and calls ``mf.train.meta_train`` with the
    original seed for retraining from the same initialisation. ``factor`` scales the item's
    weight instead of zeroing it (``1 ± ε`` for infinitesimal checks).

    ``checkpoint_dir``: a :class:`~metafluence._store.ProgressStore` directory; every
    ``chunk_size`` finished retrains are saved atomically, and a rerun (e.g. after the process
    was killed) loads them instead of retraining, giving the identical result. The store is
    bound to ``items``, ``factor``, ``indices``, ``f(λ*)`` and fingerprints of λ*, the tasks and
    the target tasks; a different configuration raises ``ValueError``. The retrainer cannot be
    fingerprinted (only its name is recorded): use a new directory when changing it.

    Every retrain is checked: ``‖∇F_{-e}(λ_e)‖`` (the retrained objective's gradient, one pass
    over the tasks) is measured, a ``RuntimeWarning`` names the items whose retrain ended above
    ``stationary_tol`` (their ``Δf`` is not that of a converged retrain), and ``details`` (a
    list, if given) receives one dict per item: ``item``, ``df``, ``grad_norm``, ``converged``.
    """
    if items not in ITEMS:
        raise ValueError(f"items={items!r}: expected one of {ITEMS}")
    lam = problem.flat(meta_params)
    batch = problem.batch(train_tasks, lam)
    named = retrain if retrain is not None else newton_retrain
    retrain = newton_retrain(problem) if retrain is None else _two_arg(retrain)
    idx = item_index(batch, items) if indices is None else list(indices)
    f0 = target_value(problem, lam, target)
    start = problem.unflat(lam)
    store = None
    if checkpoint_dir is not None:
        config = {
            "stage": "leave_one_out",
            "items": items,
            "factor": float(factor),
            "indices": idx,
            "chunk_size": int(chunk_size),
            **stage_fingerprint(lam, train_tasks, target, f0, named),
        }
        store = ProgressStore(checkpoint_dir, config)

    def compute(r: tuple[int, int]) -> dict[str, Tensor]:
        df, gn = [], []
        for item in idx[r[0] : r[1]]:
            without = reweighted(batch, items, item, factor)
            new = retrain(without, start)
            df.append(target_value(problem, new, target) - f0)
            gn.append(float(problem.point(new, without).meta_grad().norm()))
        return {
            "df": torch.tensor(df, dtype=torch.float64),
            "grad_norm": torch.tensor(gn, dtype=torch.float64),
        }

    bar = progress_bar(len(idx), progress, f"leave-one-out ({items})")
    try:
        chunks = map_chunks(compute, len(idx), chunk_size, store, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if not chunks:
        return torch.zeros(0, dtype=lam.dtype)
    df = torch.cat([c["df"] for c in chunks])
    gn = torch.cat([c.get("grad_norm", torch.full_like(c["df"], float("nan"))) for c in chunks])
    _report_retrains(idx, df, gn, stationary_tol, details)
    return df.to(lam.dtype)


def _report_retrains(
    idx: list[Any],
    df: Tensor,
    grad_norm: Tensor,
    tol: float,
    details: list[dict[str, Any]] | None,
) -> None:
    """Warn about retrains that did not reach ``‖∇F_{-e}‖ ≤ tol``; fill ``details``."""
    bad = [(i, float(g)) for i, g in zip(idx, grad_norm.tolist(), strict=True) if not g <= tol]
    if bad:
        shown = ", ".join(f"{i} (‖∇F‖ = {g:.2g})" for i, g in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(
            f"leave_one_out: {len(bad)} of {len(idx)} retrains did not reach ‖∇F_-e‖ <= "
            f"{tol:g}: {shown}{more}; their Δf is not that of a converged retrain (use a "
            "retrainer that converges, e.g. more Newton steps)",
            RuntimeWarning,
            stacklevel=3,
        )
    if details is not None:
        details.extend(
            {"item": i, "df": float(d), "grad_norm": float(g), "converged": bool(g <= tol)}
            for i, d, g in zip(idx, df.tolist(), grad_norm.tolist(), strict=True)
        )


def stage_fingerprint(
    lam: Tensor,
    train_tasks: TasksLike,
    target: TargetLike,
    f0: float,
    retrain: Callable[..., Any],
) -> dict[str, Any]:
    """Config entries that bind a retraining stage's progress store to its inputs.

    λ*, the tasks and list-like targets are hashed (:func:`~metafluence._store.digest`;
    ``None`` where an input cannot be fingerprinted, e.g. a one-pass iterator); a callable
    target is recorded by name and, through ``f0 = f(λ*)`` (exact ``repr``), by its value.
    """
    fn = target if callable(target) and not isinstance(target, Sequence) else None
    return {
        "meta_params": digest(lam),
        "train_tasks": digest(train_tasks, strict=False) if _listlike(train_tasks) else None,
        "target": getattr(fn, "__qualname__", repr(type(fn)))
        if fn is not None
        else digest(target, strict=False),
        "f0": repr(float(f0)),
        "retrain": getattr(retrain, "__qualname__", type(retrain).__qualname__),
        "P": int(lam.numel()),
    }


def _listlike(x: Any) -> bool:
    return isinstance(x, (list, tuple, Task, TaskBatch))
