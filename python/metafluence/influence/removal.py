"""Removal effects, parameter influence and editing (math.md §3).

For an item ``e`` with weight ``ω_e`` the removal effect on a target ``f`` is

    Δf_{-e} ≈ ω_e · sᵀ ∂_{ω_e} ∇F(λ*),      s = (H + δ'I)⁻¹ ∇f(λ*)   (the s-test),

positive when removing ``e`` would raise the target loss (``e`` helps), negative when ``e`` is
harmful. One total solve gives ``s``; then a *single* exact mixed Hessian-vector product of the
weighted meta-objective ``Φ(λ, c, W, V) = Σ_k c_k F_k(λ, W_k, V_k)`` along ``(s, 0, 0, 0)`` gives
every item's score at once:

- task ``k``:          ``c_k · [∂_c ∂_λ Φ · s]_k = c_k sᵀ g_k``;
- support point ``j``: ``w_kj · [∂_W ∂_λ Φ · s]_kj = w_kj c_k ∂_{w_kj}(sᵀ g_k)``;
- query point ``q``:   ``v_kq · [∂_V ∂_λ Φ · s]_kq = v_kq (c_k/m_k) sᵀ D_λ ℓ(z_q; θ_k)``.

Parameter influence of a group ``R``: ``Δλ_{-R} = (H + δ'I)⁻¹ Σ_{e∈R} ω_e ∂_{ω_e}∇F``, where the sum
is the λ-block of ``∇²Φ · (0, c⊙1_R, W⊙1_R, V⊙1_R)``: one mixed product and one solve.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_int
from ..bilevel.point import BilevelPoint, check_curvature
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..bilevel.tasks import check_items
from ..solvers import SolveResult, get_solver, lanczos_extreme_eigenvalues
from . import _checkpoint as ck
from ._newton import newton_descent
from .query import QUERY_METHODS, query_point_scores
from .regime import newton_check as newton_check_fn
from .regime import regime_from_check
from .support import exact_support_scores

ITEMS = ("task", "support_point", "query_point")
TargetLike = TasksLike | Callable[[dict[str, Tensor]], Tensor]


@dataclass
class InfluenceResult:
    """Scores and everything needed to judge them.

    Attributes:
        scores: ``items="task"``: ``[M]``; point items: list of ``M`` tensors ``[n]`` / ``[m]``.
        items: the item kind of ``scores``.
        all_scores: the three kinds (they cost the same single mixed product).
        solve: the shared total solve ``s = (H + δ'I)⁻¹ ∇f`` (:class:`SolveResult`).
        meta_grad_norm: ``‖∇F(λ*)‖`` — how far ``λ*`` is from stationary.
        diagnostics: conditioning of ``H + δ'I`` (Lanczos estimates), regime, warnings.
        task_ids: ids of the training tasks, in score order.
    """

    scores: Tensor | list[Tensor]
    items: str
    all_scores: dict[str, Any]
    solve: SolveResult
    meta_grad_norm: float
    diagnostics: dict[str, Any]
    task_ids: list[Any]
    target_grad: Tensor = field(repr=False, default_factory=lambda: torch.empty(0))

    def ranking(self) -> list[tuple[Any, ...]]:
        """Items sorted from most harmful (most negative score) to most helpful."""
        if self.items == "task":
            s = self.scores
            assert isinstance(s, Tensor)
            order = torch.argsort(s).tolist()
            return [(self.task_ids[i], float(s[i])) for i in order]
        flat = [
            (self.task_ids[k], j, float(v))
            for k, row in enumerate(self.scores)
            for j, v in enumerate(row.tolist())
        ]
        return sorted(flat, key=lambda t: t[-1])


def _check_items(items: str) -> str:
    if items not in ITEMS:
        raise ValueError(f"items={items!r}: expected one of {ITEMS}")
    return items


def target_gradient(problem: MetaProblem, lam: Tensor, target: TargetLike | None) -> Tensor:
    """``∇f(λ) [P]``: mean post-adaptation query loss of target tasks, or a callable's gradient."""
    if target is None:
        raise ValueError(
            "target is required: held-out target tasks, or a callable f(meta_params) -> scalar"
        )
    if callable(target) and not isinstance(target, Sequence):

        def f(flat: Tensor) -> Tensor:
            out = target(problem.spec.unflatten(flat))
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise ValueError("target callable must return a scalar tensor")
            return out.reshape(())

        return torch.func.grad(f)(lam).detach()
    tp = problem.point(lam, target)
    return (tp.grad_all()[0] - problem.damping * lam).detach()


def target_value(problem: MetaProblem, meta_params: ParamsLike, target: TargetLike) -> float:
    """``f(λ)``: mean post-adaptation query loss of target tasks, or the callable's value."""
    if callable(target) and not isinstance(target, Sequence):
        lam = problem.flat(meta_params)
        return float(target(problem.spec.unflatten(lam)))
    return float(problem.outer_loss(meta_params, target))


def _finite_target_gradient(g: Tensor) -> Tensor:
    if not bool(torch.isfinite(g).all()):
        raise ValueError("target gradient contains NaN or Inf: check the target (tasks/callable)")
    return g


def _solve(
    pt: BilevelPoint,
    b: Tensor,
    curvature: str,
    solver: str,
    solve_damping: float,
    solver_kwargs: Mapping[str, Any] | None,
) -> SolveResult:
    check_curvature(curvature)
    if not (float(solve_damping) >= 0 and math.isfinite(float(solve_damping))):
        raise ValueError(f"solve_damping={solve_damping}: expected a finite δ' >= 0")
    fn = get_solver(solver)
    # always [k, P]: solvers then apply the operator to all basis/Krylov rows in one batched
    # call (a 1-D b makes them call matvec once per row, i.e. one pass over the tasks each)
    one = b.dim() == 1
    res = fn(
        pt.matvec(curvature),
        b.unsqueeze(0) if one else b,
        damping=float(solve_damping),
        **dict(solver_kwargs or {}),
    )
    if one:
        cc = res.column_converged
        res = dataclasses.replace(
            res,
            x=res.x[0],
            residual=res.residual.reshape(()),
            column_converged=None if cc is None else cc.reshape(()),
        )
    _warn_unconverged(res, solver, curvature, stacklevel=4)
    return res


def _warn_unconverged(res: SolveResult, solver: str, curvature: str, stacklevel: int) -> None:
    if not res.converged:
        warnings.warn(
            f"total solve ({solver}, curvature={curvature}) did not converge: relative residual "
            f"{_fmt(res.residual)} after {res.iters} iterations; scores are approximate "
            "(raise maxiter, add solve_damping, or use solver='direct' for small P)",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def _fmt(t: Tensor) -> str:
    return f"{float(t.max()):.3g}" if t.numel() else "n/a"


def diagnose(
    pt: BilevelPoint,
    curvature: str,
    solve_damping: float,
    steps: int = 20,
    seed: int = 0,
    ill_conditioned_above: float = 1e3,
) -> dict[str, Any]:
    """Extreme-eigenvalue estimates of ``H + δ'I`` (Lanczos) and the regime they imply.

    The smallest Ritz value is an *upper bound* on ``λ_min``; the largest a lower bound on
    ``λ_max``. Regimes: ``"indefinite"`` (``λ_min ≤ 0``: influence undefined without damping),
    ``"proximal"`` (``δ' > 0``: scores predict ``argmin F_{-e}(λ) + δ'/2‖λ − λ*‖²``, not plain
    retraining), ``"ill_conditioned"`` (``λ_max/λ_min > ill_conditioned_above``: near-flat
    directions; whole removals may not follow first-order predictions), ``"well_conditioned"``.

    The default threshold 1e3 is empirical (benchmarks/results/fidelity_tables.md, tests): on
    small MAMLs, Spearman against plain leave-one-out was 0.38 at condition 2.8e3 and 0.88 at
    1.3e3, but 0.97–1.0 at condition ≤ 2.2e2.
    """
    P = pt.lam.shape[0]
    mv = pt.matvec(curvature, solve_damping)
    lo, hi = lanczos_extreme_eigenvalues(
        mv, P, dtype=pt.lam.dtype, device=pt.lam.device, steps=min(int(steps), P), seed=seed
    )
    notes: list[str] = []
    if lo <= 0:
        regime = "indefinite"
        notes.append(
            f"H + δ'I is not positive definite (λ_min ≈ {lo:.3g}): scores are unreliable; "
            "use curvature='gauss_newton' or a positive solve_damping"
        )
    elif solve_damping > 0:
        regime = "proximal"
        notes.append(
            f"solve_damping={solve_damping:g}: scores predict the proximal response "
            "argmin_λ F_-e(λ) + δ'/2‖λ − λ*‖², not plain leave-one-out retraining"
        )
    elif hi / lo > ill_conditioned_above:
        regime = "ill_conditioned"
        notes.append(
            f"H is ill-conditioned (λ_max/λ_min ≈ {hi / lo:.3g}): along near-flat directions "
            "whole removals may not track first-order predictions; newton_check=8 tests it, "
            "solve_damping predicts the proximal response"
        )
    else:
        regime = "well_conditioned"
    return {
        "lambda_min": lo,
        "lambda_max": hi,
        "condition": hi / lo if lo > 0 else math.inf,
        "lanczos_steps": min(int(steps), P),
        "regime": regime,
        "notes": notes,
    }


def removal_effects(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike | None = None,
    items: str = "task",
    curvature: str = "exact",
    solver: str = "cg",
    solve_damping: float = 0.0,
    solver_kwargs: Mapping[str, Any] | None = None,
    diagnostics: bool = True,
    lanczos_steps: int = 20,
    task_weight: Tensor | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    query_method: str = "mixed",
    newton_check: int = 0,
    support_response: str = "auto",
) -> InfluenceResult:
    """Predicted change of ``target`` when each item is removed (math.md §3 sign convention).

    Args:
        problem: the :class:`MetaProblem`.
        meta_params: trained ``λ*`` (dict name → tensor, or the flat vector).
        train_tasks: the ``M`` meta-training tasks (a list of :class:`Task` or a TaskBatch).
        target: held-out target tasks (``f`` = their mean post-adaptation query loss), or
            ``callable(meta_params) -> scalar``.
        items: ``"task"`` (scores ``[M]``), ``"support_point"`` or ``"query_point"``
            (list of ``M`` tensors ``[n]`` / ``[m]``).
        curvature: ``"exact" | "gauss_newton" | "gamma"``.
        solver: ``"cg" | "neumann" | "direct" | "arnoldi"``.
        solve_damping: ``δ'`` added to ``H`` in the solve only (predicts the proximal response).
        checkpoint_dir: a progress directory: the total solve, the scores of every chunk of
            ``problem.chunk_size`` tasks and the diagnostics are saved there atomically (with
            checksums) as each finishes, and a rerun with the same inputs (e.g. after the
            process was killed) loads them instead of recomputing (a streamed source does not
            even adapt the finished chunks' tasks), returning the identical result. A damaged
            file is reported (``RuntimeWarning`` naming it) and recomputed; different inputs
            (λ*, tasks, target, curvature, solver, ...) raise ``ValueError`` naming the keys.
            ``items`` may change between reruns (all three kinds are stored).
        query_method: ``"mixed"`` (one exact mixed product per chunk gives all three kinds),
            or, for ``items="task"|"query_point"``, ``"psg"`` (fused per-sample-gradient dots,
            :func:`metafluence.influence.query.query_point_scores`) or ``"jvp"`` (its
            task-batched forward-mode twin): query-point scores ``v_kq (c_k/m) ⟨Θ_λ,k s,
            ∇_Θ ℓ(z_q; Θ_k)⟩`` without the second-order pass, task scores as their row sums;
            ``all_scores["support_point"]`` is then None (not computed).
        support_response: ``"exact"`` (the task's gradient recomputed without each support
            point, :func:`metafluence.influence.support.exact_support_scores`: still one
            Newton step in λ, but exact in the inner map's response to the removal; ``n + 1``
            extra passes over the tasks), ``"linear"`` (the derivative in the point's weight,
            math.md §3: no extra pass), or ``"auto"`` (default: ``"exact"`` when ``items`` is
            ``"support_point"``, else ``"linear"``). On the glyph default the exact response
            raised Spearman against retraining from 0.55 to 0.98 (benchmarks/results/
            fidelity.md). Tasks and query points are linear in their weights: unchanged.
        newton_check: with ``diagnostics``, the number of items (spread over the ranking) that
            :func:`metafluence.influence.regime.newton_check` retrains cheaply (the
            first-order step, then two Newton steps on the objective without the item) to test
            whether the scores rank as retraining would; ``diagnostics["newton_check"]`` holds
            the result and, for a plain solve (δ' = 0), ``diagnostics["regime"]`` becomes
            ``"linear"`` (scores track leave-one-out retraining) or ``"nonlinear"`` (they do
            not: use ``solve_damping`` or ``mf.edit(newton_steps=k)``). 0 (default) skips it
            and the regime comes from the Lanczos condition number alone.

    Cost: one solve with ``H`` (shared by every item), one mixed HVP for all scores,
    ``lanczos_steps`` HVPs for the diagnostics, and for the Newton check one
    ``newton_check``-column solve plus ``2·newton_check`` single solves.
    """
    _check_items(items)
    newton_check = check_int(newton_check, "newton_check", minimum=0)
    exact_support = _exact_support(support_response, items == "support_point")
    if query_method not in ("mixed", *QUERY_METHODS):
        raise ValueError(
            f"query_method={query_method!r}: expected 'mixed' or one of {QUERY_METHODS}"
        )
    if query_method != "mixed" and (items == "support_point" or checkpoint_dir is not None):
        raise ValueError(
            f"query_method={query_method!r} serves items='task'/'query_point' without "
            "checkpoint_dir; support-point scores and checkpoints use query_method='mixed'"
        )
    pt = problem.point(meta_params, train_tasks, task_weight)
    store = None
    grad_f: Tensor | None = None
    if checkpoint_dir is not None:
        if ck.is_callable_target(target):  # fingerprinted by its gradient
            grad_f = _finite_target_gradient(target_gradient(problem, pt.lam, target))
        config = ck.scores_config(
            problem,
            pt,
            target,
            grad_f,
            curvature,
            solver,
            solve_damping,
            solver_kwargs,
            lanczos_steps,
            newton_check if diagnostics else 0,
        )
        store = ck.open_store(checkpoint_dir, pt, config)

    # (a) the target gradient and the total solve
    got = store.get(ck.SOLVE) if store is not None else None
    if store is not None and ck.everywhere(pt, got is not None) and got is not None:
        grad_f, res = ck.load_solve(got, pt.lam)
        check_curvature(curvature)
        _warn_unconverged(res, solver, curvature, stacklevel=3)
    else:
        if grad_f is None:
            grad_f = _finite_target_gradient(target_gradient(problem, pt.lam, target))
        res = _solve(pt, grad_f, curvature, solver, solve_damping, solver_kwargs)
        if store is not None:
            ck.save_solve(store, grad_f, res)

    # (b) every item's score: one mixed product per chunk of tasks
    if query_method == "mixed":
        t_sc, s_sc, q_sc = ck.chunked_item_scores(pt, res.x.detach(), store)
        support: list[Tensor] | None = list(s_sc.unbind(0))
    else:
        s_vec = res.x.detach()
        q_parts = [query_point_scores(problem, e, s_vec, query_method) for e in pt.engines]
        q_local = torch.cat(q_parts) if q_parts else s_vec.new_zeros(0, pt.item_widths()[1])
        q_sc = pt.reduce.cat(q_local.detach())
        t_sc, support = q_sc.sum(1), None
    if exact_support and support is not None:
        support = list(exact_support_scores(pt, res.x).unbind(0))
    all_scores: dict[str, Any] = {
        "task": t_sc,
        "support_point": support,
        "query_point": list(q_sc.unbind(0)),
    }

    # (c) diagnostics
    stored = ck.load_diagnostics(store, diagnostics, res.x) if store is not None else None
    reuse = store is not None and ck.everywhere(pt, stored is not None)
    if reuse and stored is not None:
        meta_grad_norm, diag = stored
    else:
        meta_grad_norm, diag = _diagnostics(
            pt, res, curvature, solve_damping, diagnostics, lanczos_steps
        )
    if diagnostics and newton_check > 0 and diag.get("newton_check_items") != items:
        # (also when stored diagnostics checked another item kind: a store keeps all kinds)
        assert target is not None  # target_gradient refused None
        check = newton_check_fn(
            problem,
            pt,
            train_tasks,
            task_weight,
            lambda x: target_value(problem, x, target),
            all_scores[items],
            items,
            lambda q, B, curv: _solve(q, B, curv, solver, solve_damping, solver_kwargs).x,
            solve_damping,
            curvature=curvature,
            k=newton_check,
            exact_rhs=exact_support and items == "support_point",
        )
        diag = _with_check(diag, check, items, solve_damping)
        reuse = False
    if store is not None and not reuse:
        ck.save_diagnostics(store, diagnostics, res.x, meta_grad_norm, diag)
        store.complete({"M": len(pt.ids)})
    for note in diag["notes"]:
        warnings.warn(note, UserWarning, stacklevel=2)
    return InfluenceResult(
        scores=all_scores[items],
        items=items,
        all_scores=all_scores,
        solve=res,
        meta_grad_norm=meta_grad_norm,
        diagnostics=diag,
        task_ids=list(pt.ids),
        target_grad=grad_f,
    )


def _diagnostics(
    pt: BilevelPoint,
    res: SolveResult,
    curvature: str,
    solve_damping: float,
    diagnostics: bool,
    lanczos_steps: int,
) -> tuple[float, dict[str, Any]]:
    """``(‖∇F(λ*)‖, diagnostics dict)``: Lanczos (if ``diagnostics``), inner and solve health."""
    meta_grad_norm = float(pt.meta_grad().norm())
    diag: dict[str, Any] = {"notes": []}
    if diagnostics:
        diag = diagnose(pt, curvature, solve_damping, steps=lanczos_steps)
    diag.update(pt.inner_report())
    diag["solve_converged"] = res.converged
    if res.negative_curvature:
        diag["notes"].append("the total solve met negative curvature")
    return meta_grad_norm, diag


def _with_check(
    diag: dict[str, Any], check: dict[str, Any] | None, items: str, solve_damping: float
) -> dict[str, Any]:
    """``diag`` with the Newton check's result and the regime it implies."""
    diag = dict(diag)
    diag["newton_check"] = check
    diag["newton_check_items"] = items
    if "regime" in diag:
        diag["regime"] = regime_from_check(check, diag["regime"])
    notes = list(diag.get("notes", []))
    if diag.get("regime") != "ill_conditioned":  # the check's verdict replaced that rule's
        notes = [n for n in notes if not n.startswith("H is ill-conditioned")]
    if check is not None and check["nonlinear"] and solve_damping == 0:
        notes.append(
            f"Newton check: {len(check['items'])} items retrained by Newton steps put the "
            f"expected Spearman of the scores against retraining at "
            f"{check['expected_spearman']:.2f} (< 0.9): removals are nonlinear here; consider "
            "solve_damping (proximal response) or mf.edit(newton_steps=k)"
        )
    diag["notes"] = notes
    return diag


def _exact_support(support_response: str, auto_exact: bool) -> bool:
    """Whether ``support_response`` asks for the exact support-point response (``"auto"``:
    ``auto_exact``, i.e. when support points are what is scored or removed)."""
    if support_response not in ("auto", "linear", "exact"):
        raise ValueError(
            f"support_response={support_response!r}: expected 'auto', 'linear' or 'exact'"
        )
    return support_response == "exact" or (support_response == "auto" and auto_exact)


def _checked_removal(pt: BilevelPoint, remove: Mapping[str, Sequence[Any]]) -> dict[str, list]:
    """``remove`` validated against the point's tasks (kinds, ranges) as plain lists."""
    check_items(remove, len(pt.ids), *pt.item_widths())
    return {k: list(v) for k, v in remove.items()}


def param_influence(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    remove: Mapping[str, Sequence[Any]],
    curvature: str = "exact",
    solver: str = "cg",
    solve_damping: float = 0.0,
    solver_kwargs: Mapping[str, Any] | None = None,
    return_result: bool = False,
    support_response: str = "auto",
) -> dict[str, Tensor] | tuple[dict[str, Tensor], SolveResult]:
    """``Δλ ≈ (H + δ'I)⁻¹ b_R`` for removing the group ``R``.

    ``b_R = Σ_{e∈R} ω_e ∂_{ω_e}∇F(λ*)`` (``support_response="linear"``), or the exact change
    ``b_R = ∇F(λ*) − ∇F_{-R}(λ*)`` (``"exact"``: one Newton step on the objective without
    ``R``, exact in the inner map's response to removed support points). The two agree for
    tasks and query points, which enter linearly; ``"auto"`` (default) is ``"exact"`` when
    ``remove`` has support points. ``remove`` maps ``"task"`` to task positions ``[k, ...]``
    and ``"support_point"`` / ``"query_point"`` to ``[(k, j), ...]`` pairs. Returns a
    parameter dict.
    """
    pt = problem.point(meta_params, train_tasks)
    checked = _checked_removal(pt, remove)
    if _exact_support(support_response, len(checked.get("support_point", [])) > 0):
        without = problem.batch(train_tasks, pt.lam).reweighted(checked, 0.0)
        b = pt.meta_grad() - problem.point(pt.lam, without).meta_grad()
    else:
        b = pt.removal_rhs(checked)
    res = _solve(pt, b.detach(), curvature, solver, solve_damping, solver_kwargs)
    out = problem.unflat(res.x)
    return (out, res) if return_result else out


def edit(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    remove: Mapping[str, Sequence[Any]],
    newton_steps: int = 0,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """Meta-parameters with ``remove`` taken out, without retraining: ``λ* + Δλ``.

    ``newton_steps > 0`` then applies that many Newton corrections on the objective without the
    removed items, ``λ ← λ − (H_{-R}(λ) + δ'I)⁻¹ ∇F_{-R}(λ)``, each one total solve with the same
    solver: the first-order edit becomes a (locally quadratically convergent) approximation of
    actual retraining started at ``λ*``, at the cost of ``newton_steps`` extra solves.
    """
    lam = problem.flat(meta_params)
    delta = param_influence(problem, lam, train_tasks, remove, **kwargs)
    assert isinstance(delta, dict)
    new = lam + problem.spec.flatten(delta)
    if int(newton_steps) > 0:
        batch = problem.batch(train_tasks, lam).reweighted(remove, 0.0)
        curvature = kwargs.get("curvature", "exact")
        solver = kwargs.get("solver", "cg")
        solve_damping = float(kwargs.get("solve_damping", 0.0))

        def at(x: Tensor) -> tuple[Tensor, BilevelPoint]:
            q = problem.point(x, batch)
            return q.meta_grad().detach(), q

        def step_at(q: BilevelPoint, g: Tensor) -> Tensor:
            return _solve(q, g, curvature, solver, solve_damping, kwargs.get("solver_kwargs")).x

        new, _ = newton_descent(at, step_at, new, newton_steps)
    return problem.unflat(new)
