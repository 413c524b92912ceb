"""Newton steps with backtracking on ``‖∇‖`` for ``mf.edit`` and the regime check (the loop:
:func:`metafluence.solvers.newton.damped_newton`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..solvers.newton import damped_newton


def newton_descent(
    at: Callable[[Tensor], tuple[Tensor, Any]],
    step_at: Callable[[Any, Tensor], Tensor],
    x: Tensor,
    steps: int,
    halvings: int = 10,
) -> tuple[Tensor, Tensor]:
    """``steps`` damped Newton steps ``x ← x − t·step_at(point(x), ∇(x))`` from ``x``.

    ``at(x)`` returns ``(∇(x), point)``: the gradient and whatever the step needs at ``x`` (a
    :class:`~metafluence.bilevel.point.BilevelPoint`), built once per iterate. ``t`` halves from
    1 until ``‖∇‖`` decreases (at most ``halvings`` times); without a decrease ``x`` is
    stationary to working precision and the loop stops. Returns ``(x, ∇(x))``.

    A thin wrapper of :func:`metafluence.solvers.newton.damped_newton` (``trials = halvings``).
    """
    res = damped_newton(at, lambda _x, g, point: step_at(point, g), x, steps, trials=int(halvings))
    return res.x, res.grad
