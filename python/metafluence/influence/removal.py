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

Those blocks are linear in ``s``, and each exact product the solve made gave them along its
direction: when ``s`` lies in the span of those directions (a Krylov solve's does) the mixed
product is read off the solve (:mod:`metafluence.bilevel._tape`) instead of made again.

Parameter influence of a group ``R``: ``Δλ_{-R} = (H + δ'I)⁻¹ Σ_{e∈R} ω_e ∂_{ω_e}∇F``, where the sum
is the λ-block of ``∇²Φ · (0, c⊙1_R, W⊙1_R, V⊙1_R)``: one mixed product and one solve.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_bool, check_int
from ..bilevel._tape import ProductTape
from ..bilevel.curvature import Curvature, as_curvature, resolve_auto
from ..bilevel.point import BilevelPoint
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..data.tasks import check_items
from ..solvers import EigenBounds, SolveResult, lanczos_eigen_bounds
from . import _checkpoint as ck
from ._newton import newton_descent
from .query import QUERY_METHODS, query_point_scores_all
from .regime import RETRAIN_RESIDUAL, TRACK_BELOW, regime_from_check
from .regime import newton_check as newton_check_fn
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
    return problem.point(lam, target).outer_grad().detach()


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


def _solve(pt: BilevelPoint, b: Tensor, curv: Curvature, purpose: str) -> SolveResult:
    """``(H + δ'I)⁻¹ b`` with ``curv`` (rows of ``b [k, P]`` in one batched solve); warns, naming
    ``purpose``, when it did not converge."""
    res = curv.solve(pt, b)
    _warn_unconverged(res, curv, purpose, stacklevel=4)
    return res


def _warn_unconverged(res: SolveResult, curv: Curvature, purpose: str, stacklevel: int) -> None:
    if not res.converged:
        warnings.warn(
            f"{purpose} ({curv.solver}, curvature={curv.kind}, solve_damping="
            f"{curv.solve_damping:g}) did not converge: relative residual {_fmt(res.residual)} "
            f"after {res.iters} iterations; scores are approximate (raise maxiter, add "
            "solve_damping, or fit a curvature: mf.fit_curvature)",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def _fmt(t: Tensor) -> str:
    return f"{float(t.max()):.3g}" if t.numel() else "n/a"


def diagnose(
    pt: BilevelPoint,
    curvature: str | Curvature,
    solve_damping: float = 0.0,
    steps: int = 20,
    seed: int = 0,
    ill_conditioned_above: float = 1e3,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Extreme eigenvalues of ``H + δ'I`` and the regime they imply.

    Exact from a dense curvature fit (``method="dense"``, the default for ``P ≤ 1024``). From a
    low-rank or secant fit its Ritz values, at no cost: ``θ_1 ≥ λ_min`` and ``θ_r ≤ λ_max`` only
    (no certified bound the other way, so such a fit never certifies ``well_conditioned``).
    Otherwise Lanczos (:func:`metafluence.solvers.lanczos_eigen_bounds`): the smallest Ritz value
    ``θ_1`` is an *upper* bound on ``λ_min`` (so ``condition = θ_m/θ_1`` is a lower bound on
    ``κ = λ_max/λ_min``), and ``θ_1 − r_1`` (``r_1`` the Ritz residual) a lower bound, giving
    ``κ ≤ condition_upper = (θ_m + r_m)/(θ_1 − r_1)``. ``steps`` Lanczos steps run first; while
    the bounds cannot decide the regime the same Krylov sequence is continued (``2·steps``,
    ``4·steps``, …, at most ``max_steps``, default ``4·steps``). Regimes:

    - ``"indefinite"``: ``λ_min ≤ 0`` (certain: ``θ_1 ≤ 0``): influence undefined without
      damping;
    - ``"proximal"``: ``δ' > 0``: scores predict ``argmin F_{-e}(λ) + δ'/2‖λ − λ*‖²``, not plain
      retraining;
    - ``"ill_conditioned"``: ``κ > ill_conditioned_above`` is certain (``condition`` exceeds
      it): near-flat directions; whole removals may not follow first-order predictions;
    - ``"well_conditioned"``: ``κ ≤ ill_conditioned_above`` is certified (``condition_upper``
      is below it);
    - ``"uncertain"``: the bounds straddle the threshold (or ``θ_1 − r_1 ≤ 0``) after
      ``max_steps``: the label is not decided (raise ``steps``, fit a dense curvature, or run
      the Newton check).

    The default threshold 1e3 is empirical (benchmarks/results/fidelity_tables.md, tests): on
    small MAMLs, Spearman against plain leave-one-out was 0.38 at condition 2.8e3 and 0.88 at
    1.3e3, but 0.97–1.0 at condition ≤ 2.2e2.

    Returns a dict: ``lambda_min`` (``θ_1``), ``lambda_max`` (``θ_m``), ``lambda_min_lower``,
    ``lambda_max_upper``, ``condition`` (lower bound), ``condition_upper``, ``condition_exact``,
    ``lanczos_steps`` (steps used; 0 when exact from a dense fit), ``regime``, ``notes``.
    """
    curv = as_curvature(curvature, solve_damping=solve_damping)  # δ' twice is refused there
    steps = check_int(steps, "steps", minimum=1)
    max_steps = 4 * steps if max_steps is None else check_int(max_steps, "max_steps", minimum=1)
    thr = float(ill_conditioned_above)
    dp = curv.solve_damping
    P = pt.lam.shape[0]
    exact = curv.extreme_eigenvalues() if curv.fits(pt) else None
    ritz = curv.ritz_extremes() if curv.fits(pt) else None
    if exact is not None:
        b = EigenBounds(exact[0], exact[1], steps=0, exact=True)
    elif ritz is not None:  # the fit's own Ritz values: one-sided bounds, no pass (ε = 1: ∞)
        b = EigenBounds(ritz[0], ritz[1], steps=0, exact=False, eps=1.0)
    else:

        def decided(bd: EigenBounds) -> bool:
            r = _regime(bd, dp, thr)
            return r != "uncertain" and (r != "proximal" or bd.lambda_min_lower > 0)

        b = lanczos_eigen_bounds(
            curv.operator(pt),
            P,
            dtype=pt.lam.dtype,
            device=pt.lam.device,
            steps=min(steps, P),
            max_steps=max(min(max_steps, P), min(steps, P)),
            seed=seed,
            decided=decided,
        )
    regime = _regime(b, dp, thr)
    lo, hi = b.lambda_min, b.lambda_max
    cond_lo, cond_hi = b.condition_bounds()
    notes: list[str] = []
    bound = (
        ""
        if b.exact
        else " (Ritz values of the curvature fit: at least)"
        if ritz is not None and exact is None
        else f" (Lanczos, {b.steps} steps: at least)"
    )
    if regime == "indefinite":
        notes.append(
            f"H + δ'I is not positive definite (λ_min ≈ {lo:.3g}): scores are unreliable; "
            "use curvature='gauss_newton' or a positive solve_damping"
        )
    elif regime == "proximal":
        notes.append(
            f"solve_damping={dp:g}: scores predict the proximal response "
            "argmin_λ F_-e(λ) + δ'/2‖λ − λ*‖², not plain leave-one-out retraining"
        )
        if b.lambda_min_lower <= 0:
            notes.append(
                f"H + δ'I positive definite not certified: λ_min ∈ [{b.lambda_min_lower:.3g}, "
                f"{lo:.3g}] after {b.steps} Lanczos steps"
            )
    elif regime == "ill_conditioned":
        notes.append(
            f"H is ill-conditioned (λ_max/λ_min ≈ {cond_lo:.3g}{bound}): along near-flat "
            "directions whole removals may not track first-order predictions; newton_check=8 "
            "tests it, solve_damping predicts the proximal response"
        )
    elif regime == "uncertain":
        notes.append(
            f"conditioning uncertain: λ_max/λ_min is between {cond_lo:.3g} and {cond_hi:.3g} "
            f"after {b.steps} Lanczos steps (threshold {thr:g}; λ_min ∈ "
            f"[{b.lambda_min_lower:.3g}, {lo:.3g}]); raise lanczos_steps, fit a dense "
            "curvature (mf.fit_curvature(method='dense')) or run newton_check=8"
        )
    return {
        "lambda_min": lo,
        "lambda_max": hi,
        "lambda_min_lower": b.lambda_min_lower,
        "lambda_max_upper": b.lambda_max_upper,
        "condition": cond_lo,
        "condition_upper": cond_hi,
        "condition_exact": b.exact,
        "spectrum_from": "dense fit"
        if exact is not None
        else "fit Ritz values"
        if ritz is not None
        else "lanczos",
        "lanczos_steps": b.steps,
        "regime": regime,
        "notes": notes,
    }


_CONDITION_NOTES = ("H is ill-conditioned", "conditioning uncertain")


def _regime(b: EigenBounds, solve_damping: float, threshold: float) -> str:
    """The regime :func:`diagnose` reads off the bounds ``b`` (``"uncertain"`` when they
    cannot decide it)."""
    if b.lambda_min <= 0:
        return "indefinite"
    if solve_damping > 0:
        return "proximal"
    cond_lo, cond_hi = b.condition_bounds()
    if cond_lo > threshold:
        return "ill_conditioned"
    if cond_hi <= threshold:
        return "well_conditioned"
    return "uncertain"


def removal_effects(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike | None = None,
    items: str = "task",
    curvature: str | Curvature = "exact",
    solver: str = "auto",
    solve_damping: float = 0.0,
    solver_kwargs: Mapping[str, Any] | None = None,
    diagnostics: bool = True,
    lanczos_steps: int = 20,
    task_weight: Tensor | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    query_method: str = "mixed",
    newton_check: int = 0,
    support_response: str = "auto",
    targets: Sequence[TargetLike] | None = None,
) -> InfluenceResult:
    """Predicted change of ``target`` when each item is removed (math.md §3 sign convention).

    Args:
        problem: the :class:`MetaProblem`.
        meta_params: trained ``λ*`` (dict name → tensor, or the flat vector).
        train_tasks: the ``M`` meta-training tasks (a list of :class:`Task` or a TaskBatch).
        target: held-out target tasks (``f`` = their mean post-adaptation query loss), or
            ``callable(meta_params) -> scalar``.
        targets: instead of ``target``, a list of ``T`` targets (each as ``target``; e.g. one
            per test point): one multi-right-hand-side solve, and scores with a last dimension
            ``T`` (``[M, T]`` for tasks; ``M`` tensors ``[n, T]`` / ``[m, T]`` for points) —
            the score matrix of dattri/kronfluence. Not with ``checkpoint_dir`` or
            ``newton_check``.
        items: ``"task"`` (scores ``[M]``), ``"support_point"`` or ``"query_point"``
            (list of ``M`` tensors ``[n]`` / ``[m]``).
        curvature: a :class:`~metafluence.bilevel.curvature.Curvature` from
            :func:`mf.fit_curvature` (fitted once, reused by every solve; it carries the
            solver and ``δ'``), or ``"exact" | "gauss_newton" | "gamma"`` for an unfitted one
            built from ``solver``, ``solve_damping`` and ``solver_kwargs``.
        solver: ``"auto"`` (default: a dense eigendecomposition, exact and reused by every
            solve of the call, for ``P ≤ 1024``; CG above) or ``"cg" | "neumann" | "direct" |
            "arnoldi"``. Earlier versions defaulted to ``"cg"`` (often unconverged at
            ``maxiter=100`` on small ill-conditioned problems).
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

    Cost: one solve with ``H`` (shared by every item), one mixed HVP for all scores (none
    when ``s`` lies in the span of the solve's own exact products, e.g. a Krylov solve on the
    exact curvature of an unrolled map: the same backward passes gave the item blocks,
    :mod:`metafluence.bilevel._tape`),
    ``lanczos_steps`` HVPs for the diagnostics, and for the Newton check one
    ``newton_check``-column solve plus ``2·newton_check`` single solves.
    """
    # (0) validate every argument once
    _check_items(items)
    newton_check = check_int(newton_check, "newton_check", minimum=0)
    lanczos_steps = check_int(lanczos_steps, "lanczos_steps", minimum=1)
    diagnostics = check_bool(diagnostics, "diagnostics")
    exact_support = _exact_support(support_response, items == "support_point")
    _check_query_method(query_method, items, checkpoint_dir)
    curv = as_curvature(curvature, solver, solve_damping, solver_kwargs)
    many = _check_targets(target, targets, checkpoint_dir, newton_check)
    pt = curv.point(problem, meta_params, train_tasks, task_weight)
    curv = resolve_auto(curv, pt)
    if many is not None:  # T targets: one multi-RHS solve, no store, no Newton check
        grad_f, res, all_scores = _multi_target(
            problem, pt, curv, many, exact_support, query_method
        )
        meta_grad_norm, diag = _diagnostics(
            pt, res, curv, diagnostics, lanczos_steps, all_scores["task"]
        )
        return _result(all_scores, items, res, meta_grad_norm, diag, pt, grad_f)
    store, grad_f = _open_store(
        problem, pt, target, curv, checkpoint_dir, lanczos_steps, newton_check if diagnostics else 0
    )
    # (a) the target gradient ∇f(λ*) and the total solve s = (H + δ'I)⁻¹ ∇f
    grad_f, res, tape, save_last = _target_solve(problem, pt, target, curv, store, grad_f)
    # (b) every item's score: read off the solve's products, else one mixed product per chunk
    all_scores = _item_scores(problem, pt, res.x.detach(), store, query_method, exact_support, tape)
    if save_last:  # the chunks its products gave are saved: now the solve
        ck.save_solve(store, grad_f, res, tape=True)
    # (c) diagnostics: ‖∇F(λ*)‖, spectrum of H + δ'I, inner and solve health
    meta_grad_norm, diag, reuse = _stored_or_new_diagnostics(
        pt, res, curv, store, diagnostics, lanczos_steps, all_scores["task"]
    )
    # (d) the Newton check of the regime (opt-in)
    if diagnostics and newton_check > 0 and diag.get("newton_check_items") != items:
        # (also when stored diagnostics checked another item kind: a store keeps all kinds)
        assert target is not None  # target_gradient refused None
        check = _newton_check(
            problem,
            pt,
            train_tasks,
            task_weight,
            target,
            all_scores[items],
            items,
            curv,
            newton_check,
            exact_support,
        )
        diag = _with_check(diag, check, items, curv.solve_damping)
        reuse = False
    if store is not None and not reuse:
        ck.save_diagnostics(store, diagnostics, res.x, meta_grad_norm, diag)
        store.complete({"M": len(pt.ids)})
    return _result(all_scores, items, res, meta_grad_norm, diag, pt, grad_f)


def _result(
    all_scores: dict[str, Any],
    items: str,
    res: SolveResult,
    meta_grad_norm: float,
    diag: dict[str, Any],
    pt: BilevelPoint,
    grad_f: Tensor,
) -> InfluenceResult:
    """The result, after warning each of the diagnostics' notes."""
    for note in diag["notes"]:
        warnings.warn(note, UserWarning, stacklevel=3)
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


def _check_query_method(query_method: str, items: str, checkpoint_dir: Any) -> None:
    if query_method not in ("mixed", *QUERY_METHODS):
        raise ValueError(
            f"query_method={query_method!r}: expected 'mixed' or one of {QUERY_METHODS}"
        )
    if query_method != "mixed" and (items == "support_point" or checkpoint_dir is not None):
        raise ValueError(
            f"query_method={query_method!r} serves items='task'/'query_point' without "
            "checkpoint_dir; support-point scores and checkpoints use query_method='mixed'"
        )


def _check_targets(
    target: TargetLike | None,
    targets: Sequence[TargetLike] | None,
    checkpoint_dir: Any,
    newton_check: int,
) -> list[TargetLike] | None:
    """``targets`` as a non-empty list (``None`` when a single ``target`` is scored)."""
    if targets is None:
        return None
    if target is not None:
        raise ValueError("give target= (one) or targets= (several), not both")
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not targets:
        raise ValueError("targets must be a non-empty list of targets (tasks or callables)")
    if checkpoint_dir is not None or newton_check:
        raise ValueError("targets= is not supported with checkpoint_dir or newton_check")
    return list(targets)


def _open_store(
    problem: MetaProblem,
    pt: BilevelPoint,
    target: TargetLike | None,
    curv: Curvature,
    checkpoint_dir: str | os.PathLike | None,
    lanczos_steps: int,
    newton_check: int,
) -> tuple[Any, Tensor | None]:
    """The progress store bound to this computation (``None`` without ``checkpoint_dir``), and
    ``∇f`` when a callable target had to be differentiated to fingerprint it."""
    if checkpoint_dir is None:
        return None, None
    grad_f = None
    if ck.is_callable_target(target):  # fingerprinted by its gradient
        grad_f = _finite_target_gradient(target_gradient(problem, pt.lam, target))
    config = ck.scores_config(problem, pt, target, grad_f, curv, lanczos_steps, newton_check)
    return ck.open_store(checkpoint_dir, pt, config), grad_f


def _target_solve(
    problem: MetaProblem,
    pt: BilevelPoint,
    target: TargetLike | None,
    curv: Curvature,
    store: Any,
    grad_f: Tensor | None,
) -> tuple[Tensor, SolveResult, Callable[[], ProductTape | None], bool]:
    """``(∇f(λ*) [P], SolveResult of s = (H + δ'I)⁻¹ ∇f, its products' tape, save_last)``,
    the solve loaded from ``store`` if there.

    The solve's exact products are recorded (:meth:`BilevelPoint.recording`): when ``s``
    lies in their span the scores are read off them (the tape, a callable giving it or
    ``None``). Such a solve is saved by the caller after the chunks of scores (``save_last``):
    a rerun finds the solve and all its chunks, or no solve, which it makes again bit for bit.
    When chunks of a stored solve of that kind are missing (damaged, deleted), its products
    are made again, once, to read them off (``x`` checked bit for bit), so a resumed run
    always equals an uninterrupted one. A solve without a usable tape is saved here."""
    got = store.get(ck.SOLVE) if store is not None else None
    purpose = "total solve for the target (s-test)"
    if store is not None and ck.everywhere(pt, got is not None) and got is not None:
        grad_f, res = ck.load_solve(got, pt.lam)
        _warn_unconverged(res, curv, purpose, stacklevel=4)
        if not got[1].get("tape"):
            return grad_f, res, lambda: None, False
        loaded = (grad_f, res)

        @functools.cache
        def again() -> ProductTape | None:
            with pt.recording() as tape, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # warned above, once
                redo = _solve(pt, loaded[0], curv, purpose)
            same = torch.equal(redo.x, loaded[1].x)
            return tape if same and tape.coefficients(redo.x.detach()) is not None else None

        return grad_f, res, again, False
    if grad_f is None:
        grad_f = _finite_target_gradient(target_gradient(problem, pt.lam, target))
    with pt.recording() as tape:
        res = _solve(pt, grad_f, curv, purpose)
    usable = tape if tape.coefficients(res.x.detach()) is not None else None
    if store is not None and usable is None:
        ck.save_solve(store, grad_f, res)
    return grad_f, res, lambda: usable, store is not None and usable is not None


def _item_scores(
    problem: MetaProblem,
    pt: BilevelPoint,
    s: Tensor,
    store: Any,
    query_method: str,
    exact_support: bool,
    tape: Callable[[], ProductTape | None] | None = None,
) -> dict[str, Any]:
    """All three kinds from ``s``: task ``c_k sᵀ g_k [M]``, support points ``w_kj c_k
    ∂_{w_kj}(sᵀ g_k)`` (or the exact response), query points ``v_kq (c_k/m) sᵀ D_λ ℓ_q``;
    read off ``tape`` (the solve's products) when ``s`` lies in their span."""
    if query_method == "mixed":
        t_sc, s_sc, q_sc = ck.chunked_item_scores(pt, s, store, tape)
        support: list[Tensor] | None = list(s_sc.unbind(0))
    else:
        q_sc = query_point_scores_all(problem, pt, s, query_method)
        t_sc, support = q_sc.sum(1), None
    if exact_support and support is not None:
        support = list(exact_support_scores(pt, s).unbind(0))
    return {"task": t_sc, "support_point": support, "query_point": list(q_sc.unbind(0))}


def _multi_target(
    problem: MetaProblem,
    pt: BilevelPoint,
    curv: Curvature,
    targets: list[TargetLike],
    exact_support: bool,
    query_method: str,
) -> tuple[Tensor, SolveResult, dict[str, Any]]:
    """``(∇f rows [T, P], the solve, scores)`` against ``T`` targets: ``S = (H + δ'I)⁻¹ [∇f_1;
    …; ∇f_T]`` in one batched solve, then each kind's scores with a trailing ``T`` dimension."""
    G = torch.stack([_finite_target_gradient(target_gradient(problem, pt.lam, t)) for t in targets])
    with pt.recording() as tape:
        res = _solve(pt, G, curv, f"total solve for {len(targets)} targets")
    cols = [
        _item_scores(problem, pt, s.detach(), None, query_method, exact_support, lambda: tape)
        for s in res.x
    ]
    all_scores: dict[str, Any] = {"task": torch.stack([c["task"] for c in cols], -1)}
    for kind in ("support_point", "query_point"):
        all_scores[kind] = None
        if cols[0][kind] is not None:
            all_scores[kind] = [
                torch.stack([c[kind][k] for c in cols], -1) for k in range(len(pt.ids))
            ]
    return G, res, all_scores


def _stored_or_new_diagnostics(
    pt: BilevelPoint,
    res: SolveResult,
    curv: Curvature,
    store: Any,
    diagnostics: bool,
    lanczos_steps: int,
    task_scores: Tensor,
) -> tuple[float, dict[str, Any], bool]:
    """``(‖∇F(λ*)‖, diagnostics, loaded from the store?)``."""
    stored = ck.load_diagnostics(store, diagnostics, res.x) if store is not None else None
    if store is not None and ck.everywhere(pt, stored is not None) and stored is not None:
        return stored[0], stored[1], True
    return (*_diagnostics(pt, res, curv, diagnostics, lanczos_steps, task_scores), False)


def _newton_check(
    problem: MetaProblem,
    pt: BilevelPoint,
    train_tasks: TasksLike,
    task_weight: Tensor | None,
    target: TargetLike,
    scores: Any,
    items: str,
    curv: Curvature,
    k: int,
    exact_support: bool,
) -> dict[str, Any] | None:
    """:func:`metafluence.influence.regime.newton_check` with this call's curvature (its own
    solves' warnings are caught and counted there: they are Newton steps of a retraining
    stand-in, not the scores' solve)."""
    exact = curv if curv.kind == "exact" else dataclasses.replace(curv.unfitted(), kind="exact")

    def solve_at(q: BilevelPoint, B: Tensor, kind: str) -> SolveResult:
        return (curv if kind == curv.kind else exact).solve(q, B)

    return newton_check_fn(
        problem,
        pt,
        train_tasks,
        task_weight,
        lambda x: target_value(problem, x, target),
        scores,
        items,
        solve_at,
        curv.solve_damping,
        curvature=curv.kind,
        k=k,
        exact_rhs=exact_support and items == "support_point",
    )


def _diagnostics(
    pt: BilevelPoint,
    res: SolveResult,
    curv: Curvature,
    diagnostics: bool,
    lanczos_steps: int,
    task_scores: Tensor,
) -> tuple[float, dict[str, Any]]:
    """``(‖∇F(λ*)‖, diagnostics dict)``: spectrum (if ``diagnostics``), inner and solve health,
    and how far λ* is from stationary *in units of the scores*: one Newton step to the
    stationary point of the quadratic model, ``Δλ = −(H + δ'I)⁻¹∇F``, changes the target by
    ``stationarity_shift = −sᵀ∇F(λ*)``; a note when that exceeds a typical task's score
    (the median ``|score|``: at a stationary point the shift is 0, elsewhere it is about the sum
    of all task scores)."""
    g = pt.meta_grad().detach()
    meta_grad_norm = float(g.norm())
    diag: dict[str, Any] = {"notes": []}
    if diagnostics:
        diag = diagnose(pt, curv, steps=lanczos_steps)
    shift = -(res.x.detach().reshape(-1, g.numel()) @ g)
    typical = float(task_scores.abs().median()) if task_scores.numel() else 0.0
    diag["stationarity_shift"] = float(shift.abs().max()) if shift.numel() else 0.0
    if diag["stationarity_shift"] > typical:
        diag["notes"].append(
            f"λ* is not stationary (‖∇F‖ = {meta_grad_norm:.3g}): one Newton step toward "
            f"stationarity would change the target by {diag['stationarity_shift']:.3g}, more "
            f"than a typical task's removal effect (median |score| {typical:.3g}); train to "
            "stationarity first "
            "(mf.train.meta_train(stationary_tol=...) or mf.train.make_stationary)"
        )
    diag.update(pt.inner_report())
    diag["solve_converged"] = res.converged
    diag["solve"] = solve_summary(res, curv)
    if res.negative_curvature:
        diag["notes"].append("the total solve met negative curvature")
    return meta_grad_norm, diag


def solve_summary(res: SolveResult, curv: Curvature) -> dict[str, Any]:
    """A JSON-able line of what a solve did (for reports): method, iterations, residual."""
    return {
        "curvature": curv.kind,
        "method": curv.method,
        "solver": curv.solver,
        "solve_damping": float(curv.solve_damping),
        "iters": int(res.iters),
        "residual": float(res.residual.max()) if res.residual.numel() else 0.0,
        "converged": bool(res.converged),
    }


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
    if diag.get("regime") not in ("ill_conditioned", "uncertain"):
        # the check's verdict replaced the condition rule's
        notes = [n for n in notes if not n.startswith(_CONDITION_NOTES)]
    if check is not None and check["nonlinear"] and solve_damping == 0:
        why = (
            f"(< {TRACK_BELOW:g}"
            if check["expected_spearman"] < TRACK_BELOW
            else f"(but {check['retrains_unfinished']} of its {len(check['residual'])} "
            f"retrains ended with a relative residual above {RETRAIN_RESIDUAL:g}, up to "
            f"{max(check['residual']):.2g}: they did not reach the retrained point"
        )
        notes.append(
            f"Newton check: {len(check['items'])} items retrained by Newton steps put the "
            f"expected Spearman of the scores against retraining at "
            f"{check['expected_spearman']:.2f} {why}; 10–90% band "
            f"{check['spearman_band'][0]:.2f}–{check['spearman_band'][1]:.2f}): removals are "
            "nonlinear here; consider "
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
    """``remove`` validated against the point's tasks (kinds, ranges) as plain lists; removing
    every task leaves no objective (ValueError)."""
    M = len(pt.ids)
    check_items(remove, M, *pt.item_widths())
    if len(remove.get("task", ())) == M:
        raise ValueError(
            f"remove takes out every task ({M} of {M}): nothing is left to meta-train on; "
            "keep at least one task"
        )
    return {k: list(v) for k, v in remove.items()}


def param_influence(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    remove: Mapping[str, Sequence[Any]],
    curvature: str | Curvature = "exact",
    solver: str = "auto",
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
    and ``"support_point"`` / ``"query_point"`` to ``[(k, j), ...]`` pairs. ``curvature``,
    ``solver``, ``solve_damping`` and ``solver_kwargs`` as in :func:`removal_effects` (pass the
    job's fitted :class:`Curvature` to reuse it). Returns a parameter dict.
    """
    return_result = check_bool(return_result, "return_result")
    curv = as_curvature(curvature, solver, solve_damping, solver_kwargs)
    pt = curv.point(problem, meta_params, train_tasks)
    curv = resolve_auto(curv, pt)
    delta, res = _param_step(problem, pt, train_tasks, remove, curv, support_response)
    out = problem.unflat(delta)
    return (out, res) if return_result else out


def _param_step(
    problem: MetaProblem,
    pt: BilevelPoint,
    train_tasks: TasksLike,
    remove: Mapping[str, Sequence[Any]],
    curv: Curvature,
    support_response: str,
) -> tuple[Tensor, SolveResult]:
    """``(Δλ [P], its solve)`` for removing ``remove`` (see :func:`param_influence`)."""
    checked = _checked_removal(pt, remove)
    if _exact_support(support_response, len(checked.get("support_point", [])) > 0):
        without = problem.batch(train_tasks, pt.lam).reweighted(checked, 0.0)
        b = pt.meta_grad() - problem.point(pt.lam, without).meta_grad()
    else:
        b = pt.removal_rhs(checked)
    res = _solve(pt, b.detach(), curv, "total solve for the edit (Δλ)")
    return res.x, res


def edit(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    remove: Mapping[str, Sequence[Any]],
    newton_steps: int = 0,
    curvature: str | Curvature = "exact",
    solver: str = "auto",
    solve_damping: float = 0.0,
    solver_kwargs: Mapping[str, Any] | None = None,
    support_response: str = "auto",
) -> dict[str, Tensor]:
    """Meta-parameters with ``remove`` taken out, without retraining: ``λ* + Δλ``.

    ``Δλ`` is :func:`param_influence` with the same ``curvature`` (a fitted :class:`Curvature`
    from :func:`mf.fit_curvature` makes the edit's solve reuse the job's factorisation).
    ``newton_steps > 0`` then applies that many Newton corrections on the objective without the
    removed items, ``λ ← λ − (H_{-R}(λ) + δ'I)⁻¹ ∇F_{-R}(λ)``, each one total solve with the same
    curvature kind and solver at the new point: the first-order edit becomes a (locally
    quadratically convergent) approximation of actual retraining started at ``λ*``, at the cost
    of ``newton_steps`` extra solves.
    """
    newton_steps = check_int(newton_steps, "newton_steps", minimum=0)
    curv = as_curvature(curvature, solver, solve_damping, solver_kwargs)
    lam = problem.flat(meta_params)
    pt = curv.point(problem, lam, train_tasks)
    curv = resolve_auto(curv, pt)
    delta, _ = _param_step(problem, pt, train_tasks, remove, curv, support_response)
    new = lam + delta
    if newton_steps > 0:
        batch = problem.batch(train_tasks, lam).reweighted(remove, 0.0)

        def at(x: Tensor) -> tuple[Tensor, BilevelPoint]:
            q = problem.point(x, batch)
            return q.meta_grad().detach(), q

        def step_at(q: BilevelPoint, g: Tensor) -> Tensor:
            return _solve(q, g, curv, "Newton correction of the edit").x

        new, _ = newton_descent(at, step_at, new, newton_steps)
    return problem.unflat(new)
