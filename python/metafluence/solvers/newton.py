r"""Damped Newton with backtracking on the gradient norm, with a pluggable linear solve.

The one Newton loop of the package: the implicit inner map's forward solve
(:mod:`metafluence.bilevel.implicit`, batched over tasks), ``mf.edit`` and the regime check
(:func:`metafluence.influence._newton.newton_descent`) and the ground-truth retrainer
(:func:`metafluence.train.newton_refine`) all run it.

For independent rows ``m`` (``x`` ``[M, P]`` with ``batched=True``, else one problem ``x``) with
gradient ``g_m(x)`` and a step ``d_m = solve(x, g, aux) ≈ H_m⁻¹ g_m``::

    x_m ← x_m − t_m d_m,   t_m = 1, ½, ¼, … (at most ``trials`` lengths)
    until ‖g_m(x_m − t_m d_m)‖ < ‖g_m(x_m)‖.

A row stops moving (is frozen) when ``‖g_m‖ ≤ tol``; when no trial length lowers ``‖g_m‖``
(stationary to working precision) unless ``accept_stalled``, which takes the shortest trial step
instead; or when ``‖g_m‖`` was at or below ``floor`` and the step did not halve it (the rounding
floor: Newton no longer makes progress there). The loop ends after ``steps`` Newton steps or
when every row is frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["NewtonResult", "damped_newton"]


@dataclass(frozen=True)
class NewtonResult:
    """``x`` and its gradient ``grad`` after the loop, ``grad_norm`` (``[M]`` with ``batched``,
    else 0-dim) and ``steps``, the Newton steps taken (``solve`` calls)."""

    x: Tensor
    grad: Tensor
    grad_norm: Tensor
    steps: int


def damped_newton(
    grad_at: Callable[[Tensor], tuple[Tensor, Any]],
    solve: Callable[[Tensor, Tensor, Any], Tensor],
    x: Tensor,
    steps: int,
    *,
    trials: int = 10,
    tol: float | None = None,
    accept_stalled: bool = False,
    floor: Tensor | float | None = None,
    batched: bool = False,
    start: tuple[Tensor, Any] | None = None,
) -> NewtonResult:
    r"""At most ``steps`` damped Newton steps ``x ← x − t·solve(x, ∇(x), aux)`` from ``x``.

    Args:
        grad_at: ``x -> (∇(x), aux)``: the gradient (shaped like ``x``) and whatever ``solve``
            needs at ``x`` (e.g. a :class:`~metafluence.bilevel.point.BilevelPoint`, built once per
            iterate), or ``None``. With ``batched`` rows move independently, so ``aux`` must not
            describe particular rows (pass ``None``).
        solve: ``(x, g, aux) -> d`` with ``H d ≈ g`` (the pluggable linear solve: dense, Cholesky,
            Krylov, structured ...); the step is ``−t·d``.
        x: the start, ``[P]`` (one problem) or ``[M, P]`` with ``batched``.
        steps: the most Newton steps.
        trials: step lengths ``1, ½, …, 2^{1−trials}`` tried per step.
        tol: freeze rows with ``‖g‖ ≤ tol`` (``None``: never).
        accept_stalled: when no trial lowers ``‖g‖``, take the last (shortest) trial instead of
            freezing the row.
        floor: ``‖g‖`` rounding floor per row (see the module docstring); ``None``: none.
        batched: rows of ``x`` are independent problems (norms and step lengths per row).
        start: ``grad_at(x)`` when the caller already has it (saves one evaluation).

    Returns:
        :class:`NewtonResult`.
    """

    def norm(g: Tensor) -> Tensor:
        return g.norm(dim=-1) if batched else g.norm()

    def per_row(v: Tensor) -> Tensor:
        return v.unsqueeze(-1) if batched else v

    g, aux = grad_at(x) if start is None else start
    norms = norm(g)
    frozen = norms <= tol if tol is not None else torch.zeros_like(norms, dtype=torch.bool)
    taken = 0
    for _ in range(int(steps)):
        if bool(frozen.all()):
            break
        d = solve(x, g, aux)
        taken += 1
        t = torch.ones_like(norms)
        for _ in range(int(trials)):
            cand = x - per_row(t) * d
            cand_g, cand_aux = grad_at(cand)
            cand_norms = norm(cand_g)
            ok = (cand_norms < norms) & ~frozen
            if bool((ok | frozen).all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        take = ok | ~frozen if accept_stalled else ok
        frozen = frozen | ~take
        x = torch.where(per_row(take), cand, x)
        g = torch.where(per_row(take), cand_g, g)
        if bool(take.any()):
            aux = cand_aux
        prev, norms = norms, torch.where(take, cand_norms, norms)
        if tol is not None:
            frozen = frozen | (norms <= tol)
        if floor is not None:
            frozen = frozen | ((prev <= floor) & (norms > 0.5 * prev))
    return NewtonResult(x=x, grad=g, grad_norm=norms, steps=taken)
