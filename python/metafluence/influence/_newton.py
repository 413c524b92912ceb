"""Newton steps with backtracking on ``‖∇‖``: shared by ``mf.edit`` and the regime check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


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
    """
    g, point = at(x)
    for _ in range(int(steps)):
        step = step_at(point, g)
        t = 1.0
        for _ in range(int(halvings)):
            cand = x - t * step
            gc, pc = at(cand)
            if float(gc.norm()) < float(g.norm()):
                break
            t *= 0.5
        else:
            break
        x, g, point = cand, gc, pc
    return x, g
