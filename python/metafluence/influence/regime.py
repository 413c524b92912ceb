"""Does first-order influence track retraining at this ``λ*``? A Newton check on a few items.

First-order influence predicts the removal of item ``e`` by one step from ``λ*`` with the
full-data Hessian: ``Δλ_e = (H + δ'I)⁻¹ b_e`` and ``Δf_e = ⟨∇f, Δλ_e⟩`` (math.md §3), where
``b_e = removal_rhs(e)``. Whether that tracks actual leave-one-out retraining is a question the
condition number of ``H`` answers only indirectly (benchmarks/results/fidelity.md: ρ = 0.93 at
condition 9e3 on the glyph default, 0.82 at condition 3e2 on a toy). The check answers it
directly on ``k`` items spread over the score ranking: it retrains each of them cheaply,
starting from the first-order step and taking ``newton_steps`` Newton steps on the objective
without the item (with its own Hessian, plus ``δ'/2‖λ − λ*‖²`` when ``δ' > 0``)::

    λ_e ← λ_e − t (H_{-e}(λ_e) + δ'I)⁻¹ (∇F_{-e}(λ_e) + δ'(λ_e − λ*)),    λ_e⁰ = λ* + Δλ_e,

(``t`` halved until the gradient norm decreases),

and compares ``f(λ_e) − f(λ*)`` with ``Δf_e``. Rankings are what users act on, so the verdict
is an estimate of the Spearman correlation between the scores and retraining: each checked
item's rank by its retrained value (among the other items' scores) against its rank by its
score; with items spread evenly over the ranking their mean squared rank change estimates that
of all items (:func:`expected_spearman`). Below ``TRACK_BELOW`` = 0.9 the removals are called
nonlinear: use ``solve_damping`` for the proximal response, whose scores track it, or
``mf.edit(newton_steps=k)`` for an edit. Also reported: the least-squares scale ``a`` of
retrained against first-order effects, and ``shift`` = median |retrained − a·Δf_e| / std(a ·
all scores).

Cost: one ``k``-column solve and ``k · newton_steps`` single solves with the retrained items'
Hessians, plus ``k`` removal right-hand sides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..bilevel.point import BilevelPoint
from ..bilevel.problem import MetaProblem, TasksLike
from ._newton import newton_descent

# expected Spearman (against retraining) under which whole removals are called nonlinear: the
# issue-6 target for rankings that track plain leave-one-out
TRACK_BELOW = 0.9


def checked_items(scores: Any, items: str, k: int) -> list[Any]:
    """``k`` item positions evenly spaced over the ranking of ``scores`` (both extremes in).

    ``scores`` is ``[M]`` for tasks (positions ``int``) or ``M`` tensors for points
    (positions ``(task, j)``). Fewer than ``k`` items: all of them.
    """
    flat = _flat(scores, items)
    if items == "task":
        pos: list[Any] = list(range(flat.numel()))
    else:
        pos = [(i, j) for i, r in enumerate(scores) for j in range(r.numel())]
    n = flat.numel()
    if n == 0 or k <= 0:
        return []
    order = torch.argsort(flat, stable=True).tolist()
    k = min(k, n)
    ranks = sorted({round(t * (n - 1) / max(k - 1, 1)) for t in range(k)})
    return [pos[order[r]] for r in ranks]


def _flat(scores: Any, items: str) -> Tensor:
    """All scores as one vector ``[n]``: ``[M]`` for tasks, the ``M`` rows concatenated for
    points (in ``(task, j)`` order)."""
    if items == "task":
        return scores.detach().reshape(-1)
    rows = [r.detach().reshape(-1) for r in scores]
    return torch.cat(rows) if rows else torch.zeros(0)


def newton_check(
    problem: MetaProblem,
    pt: BilevelPoint,
    train_tasks: TasksLike,
    task_weight: Tensor | None,
    f: Callable[[Tensor], float],
    scores: Any,
    items: str,
    solve_at: Callable[[BilevelPoint, Tensor, str], Tensor],
    solve_damping: float,
    curvature: str = "exact",
    k: int = 8,
    newton_steps: int = 2,
    track_below: float = TRACK_BELOW,
    exact_rhs: bool = False,
) -> dict[str, Any] | None:
    """The Newton check of the module docstring on ``k`` items of kind ``items``.

    Args:
        pt: the point at ``λ*`` the scores came from.
        f: ``λ [P] -> f(λ)``, the target.
        scores: the first-order scores of every item (``[M]`` or ``M`` tensors).
        solve_at: ``(point, B [k, P], curvature) -> (H(point) + δ'I)⁻¹ B`` with the scores'
            solver; the first-order step uses the scores' curvature, the Newton steps the
            exact Hessian (they stand in for retraining).
        newton_steps: Newton steps on ``F_{-e}`` (its own Hessian, backtracking) after the
            first-order step.
        exact_rhs: ``b_e = ∇F(λ*) − ∇F_{-e}(λ*)`` (the scores of
            :func:`metafluence.influence.support.exact_support_scores`) instead of the
            weight derivative ``pt.removal_rhs(e)``; the same for tasks and query points.

    Returns ``None`` when fewer than two items exist, else a dict: ``items`` (positions),
    ``first_order`` (``Δf_e``) and ``retrained`` (``f(λ_e) − f(λ*)`` after the Newton steps),
    ``residual`` (``‖∇F_{-e}(λ_e) + δ'(λ_e − λ*)‖ / ‖b_e‖``), ``scale`` (least-squares ``a``
    in ``retrained ≈ a·first_order``), ``shift`` (median ``|retrained − a·first_order|`` / std
    of ``a``·all scores), ``expected_spearman`` (:func:`expected_spearman`) and ``nonlinear``
    (``expected_spearman < track_below``).
    """
    chosen = checked_items(scores, items, k)
    flat = _flat(scores, items)
    if len(chosen) < 2 or flat.numel() < 2:
        return None
    lam = pt.lam.detach()
    base = problem.batch(train_tasks, lam, task_weight)
    without = [base.reweighted({items: [e]}, 0.0) for e in chosen]
    if exact_rhs:
        g = pt.meta_grad().detach()
        B = torch.stack([g - problem.point(lam, b).meta_grad().detach() for b in without])
    else:
        B = torch.stack([pt.removal_rhs({items: [e]}).detach() for e in chosen])
    D = solve_at(pt, B, curvature).reshape(B.shape)
    f0, dp = f(lam), float(solve_damping)
    retrained, resid = [], []
    for b, d, batch in zip(B, D, without, strict=True):

        def at(x: Tensor, batch=batch) -> tuple[Tensor, BilevelPoint]:
            q = problem.point(x, batch)
            return q.meta_grad().detach() + dp * (x - lam), q

        def step_at(q: BilevelPoint, g: Tensor) -> Tensor:
            return solve_at(q, g.unsqueeze(0), "exact").reshape(-1)

        x, r = newton_descent(at, step_at, lam + d, newton_steps)
        retrained.append(f(x) - f0)
        resid.append(float(r.norm()) / max(float(b.norm()), 1e-300))
    first = [float(v) for v in _scores_at(scores, items, chosen)]
    y = torch.tensor(retrained, dtype=torch.float64)
    x1 = torch.tensor(first, dtype=torch.float64)
    a = float((x1 @ y) / (x1 @ x1)) if float(x1 @ x1) > 0 else 1.0
    spread = abs(a) * float(flat.double().std())
    err = (y - a * x1).abs()
    shift = float(err.median()) / spread if spread > 0 else 0.0
    rho = expected_spearman(a * flat.detach().double().cpu(), a * x1, y)
    return {
        "items": [list(e) if isinstance(e, tuple) else e for e in chosen],
        "first_order": first,
        "retrained": retrained,
        "residual": resid,
        "scale": a,
        "shift": shift,
        "expected_spearman": rho,
        "nonlinear": rho < track_below,
    }


def expected_spearman(scores: Tensor, first: Tensor, retrained: Tensor) -> float:
    """Spearman between first-order scores and retraining, estimated from checked items.

    Item ``e`` ranks at ``r₀`` among ``scores`` ``[n]`` by its first-order value and would rank
    at ``r₁`` by its retrained value (among the others' first-order values); with the checked
    items spread evenly over the ranking, their mean ``(r₁ − r₀)²`` estimates the mean squared
    rank difference, and ``ρ̂ = 1 − 6·mean d² / (n² − 1)`` (Spearman's formula).
    """
    n = scores.numel()
    if n < 2:
        return 1.0
    srt = torch.sort(scores).values
    r0 = torch.searchsorted(srt, first)
    r1 = torch.searchsorted(srt, retrained) - (retrained > first).long()  # not past itself
    d2 = ((r1 - r0).double() ** 2).mean()
    return float(1.0 - 6.0 * d2 / (n * n - 1))


def _scores_at(scores: Any, items: str, chosen: list[Any]) -> list[float]:
    if items == "task":
        return [float(scores[e]) for e in chosen]
    return [float(scores[i][j]) for i, j in chosen]


def regime_from_check(check: Mapping[str, Any] | None, regime: str) -> str:
    """``"nonlinear"``/``"linear"`` from the check where it ran on a plain (δ' = 0) solve of a
    positive definite ``H``; otherwise the Lanczos regime unchanged."""
    if check is None or regime in ("indefinite", "proximal"):
        return regime
    return "nonlinear" if check["nonlinear"] else "linear"
