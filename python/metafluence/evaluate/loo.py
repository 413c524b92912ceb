"""Ground truth by retraining: leave-one-out and the proximal response (math.md §5).

For each item ``e`` the item's weight is set to 0 (a task's ``c_k``, a support point's
``w_kj``, a query point's ``v_kq``; the other weights are unchanged, as in the influence
derivation), the meta-parameters are retrained, and the true change of the target
``Δf_{-e} = f(λ*_{-e}) − f(λ*)`` is recorded: the quantity that ``removal_effect`` predicts.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_bool
from .._store import ProgressStore, digest, map_chunks
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..data.source import TaskSource
from ..data.tasks import Task, TaskBatch
from ..influence.removal import ITEMS, TargetLike, target_value
from ..solvers import lanczos_eigen_bounds
from ..train import newton_refine
from ..train._bar import progress_bar

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


class NewtonRetrain:
    """The default ground-truth retrainer: :func:`metafluence.train.newton_refine` (dense Newton
    with an eigenvalue fix) from the given start, ``proximal=δ'`` adding ``δ'/2‖λ − λ_start‖²``.

    ``retrain(batch, start) -> params``; ``last_report`` holds the
    :class:`~metafluence.train.RefineReport` fields of the last call (``‖∇F‖``, converged,
    ``λ_min`` of the dense Hessian at the result, ``minimum``, steps), which
    :func:`leave_one_out` reports per item. It does not warn itself.
    """

    def __init__(
        self, problem: MetaProblem, tol: float = 1e-12, max_steps: int = 30, proximal: float = 0.0
    ) -> None:
        self.problem, self.tol, self.max_steps, self.proximal = problem, tol, max_steps, proximal
        self.last_report: dict[str, Any] | None = None

    def __call__(
        self, batch: TaskBatch | TaskSource, start: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        prox = None
        if self.proximal > 0:
            prox = (float(self.proximal), self.problem.flat(start))
        info: dict[str, Any] = {}
        out = newton_refine(
            self.problem,
            start,
            batch,
            tol=self.tol,
            max_steps=self.max_steps,
            prox=prox,
            info=info,
            warn=False,
        )
        self.last_report = info
        return out


def newton_retrain(
    problem: MetaProblem, tol: float = 1e-12, max_steps: int = 30, proximal: float = 0.0
) -> NewtonRetrain:
    """Retrainer: dense Newton from the given start (``proximal=δ'`` adds ``δ'/2‖λ−λ*‖²``);
    see :class:`NewtonRetrain`."""
    return NewtonRetrain(problem, tol, max_steps, proximal)


class StationaryRetrain:
    """A ground-truth retrainer for any ``P``: the stationarity phase
    (:func:`metafluence.train.make_stationary`, full-batch L-BFGS) from the given start until
    ``‖∇F_{-e}‖ ≤ tol`` or ``max_evals`` evaluations — the rule that made ``λ*`` stationary,
    so that a retrain and the scores stand at the same tolerance.

    It returns the last accepted iterate (the smallest ``F``), not the most stationary one.
    ``retrain(batch, start) -> params``; ``last_report`` holds ``grad_norm`` (of the retrained
    objective), ``converged`` and ``steps`` (evaluations) of the last call, which
    :func:`leave_one_out` reports per item (whether the result is a minimum is checked there,
    by Lanczos bounds, when ``check_minimum``).
    """

    def __init__(self, problem: MetaProblem, tol: float, max_evals: int = 200) -> None:
        self.problem, self.tol, self.max_evals = problem, tol, max_evals
        self.last_report: dict[str, Any] | None = None

    def __call__(
        self, batch: TaskBatch | TaskSource, start: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        from ..train import make_stationary

        new, rep = make_stationary(
            self.problem, start, batch, tol=self.tol, max_evals=self.max_evals, keep_pairs=0,
            return_best=False,  # the lowest F reached, never the start when F fell
        )  # fmt: skip
        self.last_report = {
            "grad_norm": rep.grad_norm_after,
            "converged": rep.converged,
            "steps": rep.evaluations,
        }
        return new


def stationary_retrain(problem: MetaProblem, tol: float, max_evals: int = 200) -> StationaryRetrain:
    """Retrainer: warm L-BFGS to ``‖∇F‖ ≤ tol`` (any ``P``); see :class:`StationaryRetrain`."""
    return StationaryRetrain(problem, tol, max_evals)


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
    check_minimum: bool = True,
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

    Every retrain is checked, and nothing unconverged passes as truth silently:

    - ``‖∇F_{-e}(λ_e)‖`` (the retrained objective's gradient, one pass over the tasks; for the
      default retrainer its own report, which includes the proximal term ``δ'(λ_e − λ*)``) is
      measured; ``converged`` is ``‖∇F_{-e}‖ ≤ stationary_tol``;
    - whether ``λ_e`` is a minimum of ``F_{-e}``: the default retrainer reports the smallest
      eigenvalue of its dense Hessian there; for another retrainer, with ``check_minimum``,
      Lanczos bounds on ``λ_min(∇²F_{-e}(λ_e))`` (:func:`metafluence.solvers.lanczos_eigen_bounds`,
      20 to 80 HVPs): ``minimum`` is ``True`` when ``λ_min > 0`` is certified, ``False`` when
      ``λ_min ≤ 0`` is certain (a saddle or maximum along some direction), ``None`` when
      undecided (or not checked);
    - a ``RuntimeWarning`` names the items that did not converge or ended off a minimum;
    - ``details`` (a list, if given) receives one dict per item: ``item``, ``df``,
      ``grad_norm``, ``converged``, ``lambda_min`` (``nan`` when not checked), ``minimum``, and
      from the default retrainer ``steps`` and ``fixed_steps`` (steps that needed the
      eigenvalue fix: the refit left the start's region of positive curvature), from
      :func:`stationary_retrain` ``steps`` (its gradient evaluations).

    For large ``P`` pass ``retrain=stationary_retrain(problem, tol)`` (warm L-BFGS by the rule
    that made ``λ*`` stationary) with ``stationary_tol=tol``.
    """
    if items not in ITEMS:
        raise ValueError(f"items={items!r}: expected one of {ITEMS}")
    check_minimum = check_bool(check_minimum, "check_minimum")
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
        rows: dict[str, list[float]] = {k: [] for k in _CHECKS}
        for item in idx[r[0] : r[1]]:
            without = reweighted(batch, items, item, factor)
            new = retrain(without, start)
            rows["df"].append(target_value(problem, new, target) - f0)
            at = problem.point(new, without)
            report = getattr(retrain, "last_report", None)
            # the retrainer's own objective when it reports one (the proximal term included)
            gn = report["grad_norm"] if report is not None else at.meta_grad().norm()
            rows["grad_norm"].append(float(gn))
            for k, v in _minimum_check(at, report, check_minimum):
                rows[k].append(v)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in rows.items()}

    bar = progress_bar(len(idx), progress, f"leave-one-out ({items})")
    try:
        chunks = map_chunks(compute, len(idx), chunk_size, store, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if not chunks:
        return torch.zeros(0, dtype=lam.dtype)
    cols = {
        k: torch.cat([c.get(k, torch.full_like(c["df"], math.nan)) for c in chunks])
        for k in _CHECKS
    }
    _report_retrains(idx, cols, stationary_tol, details)
    return cols["df"].to(lam.dtype)


# per-item columns of a chunk (a stored chunk without one reads as nan): Δf, ‖∇F_-e‖, λ_min of
# ∇²F_-e there (an upper bound from Lanczos), minimum (1 / 0 / nan undecided), steps and
# eigenvalue-fixed steps of the default retrainer (nan for another)
_CHECKS = ("df", "grad_norm", "lambda_min", "minimum", "steps", "fixed_steps")


def _minimum_check(at: Any, report: dict[str, Any] | None, check: bool) -> list[tuple[str, float]]:
    """``(column, value)`` pairs of :data:`_CHECKS` after ``df`` and ``grad_norm`` for the
    retrained point ``at``: from the retrainer's ``report`` when it gives one, else from
    Lanczos bounds on the Hessian at ``at`` (``check``), else ``nan``."""
    nan = math.nan
    if report is not None and "lambda_min" in report:
        return [
            ("lambda_min", float(report["lambda_min"])),
            ("minimum", float(bool(report["minimum"]))),
            ("steps", float(report["steps"])),
            ("fixed_steps", float(report["fixed_steps"])),
        ]
    steps = float(report["steps"]) if report is not None and "steps" in report else nan
    unknown = [("steps", steps), ("fixed_steps", nan)]
    if not check:
        return [("lambda_min", nan), ("minimum", nan), *unknown]
    P = at.lam.numel()
    b = lanczos_eigen_bounds(
        at.matvec("exact"),
        P,
        dtype=at.lam.dtype,
        device=at.lam.device,
        steps=min(20, P),
        max_steps=min(80, P),
        decided=lambda bd: bd.lambda_min <= 0 or bd.lambda_min_lower > 0,
    )
    minimum = 0.0 if b.lambda_min <= 0 else (1.0 if b.lambda_min_lower > 0 else nan)
    return [("lambda_min", b.lambda_min), ("minimum", minimum), *unknown]


def _report_retrains(
    idx: list[Any],
    cols: dict[str, Tensor],
    tol: float,
    details: list[dict[str, Any]] | None,
) -> None:
    """Warn about retrains that did not reach ``‖∇F_{-e}‖ ≤ tol`` or ended off a minimum; fill
    ``details``."""
    rows = [
        dict(zip(_CHECKS, vals, strict=True))
        for vals in zip(*(cols[k].tolist() for k in _CHECKS), strict=True)
    ]
    bad = [(i, r["grad_norm"]) for i, r in zip(idx, rows, strict=True) if not r["grad_norm"] <= tol]
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
    off = [(i, r["lambda_min"]) for i, r in zip(idx, rows, strict=True) if r["minimum"] == 0]
    if off:
        shown = ", ".join(f"{i} (λ_min ≈ {v:.2g})" for i, v in off[:5])
        more = f" and {len(off) - 5} more" if len(off) > 5 else ""
        warnings.warn(
            f"leave_one_out: {len(off)} of {len(idx)} retrains ended off a minimum (the "
            f"retrained objective's Hessian has a non-positive eigenvalue): {shown}{more}",
            RuntimeWarning,
            stacklevel=3,
        )
    if details is not None:
        for i, r in zip(idx, rows, strict=True):
            m = r["minimum"]
            d = {
                "item": i,
                "df": r["df"],
                "grad_norm": r["grad_norm"],
                "converged": bool(r["grad_norm"] <= tol),
                "lambda_min": r["lambda_min"],
                "minimum": None if math.isnan(m) else bool(m),
            }
            for k in ("steps", "fixed_steps"):
                if not math.isnan(r[k]):
                    d[k] = int(r[k])
            details.append(d)


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
