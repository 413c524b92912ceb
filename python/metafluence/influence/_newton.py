"""Newton steps with backtracking on ``‖∇‖``: shared by ``mf.edit`` and the regime check."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def newton_descent(
    grad_at: Callable[[Tensor], Tensor],
    step_at: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    steps: int,
    halvings: int = 10,
) -> tuple[Tensor, Tensor]:
    """``steps`` damped Newton steps ``x ← x − t·step_at(x, ∇(x))`` from ``x``.

    ``t`` halves from 1 until ``‖grad_at‖`` decreases (at most ``halvings`` times); without a
    decrease ``x`` is stationary to working precision and the loop stops. Returns ``(x, ∇(x))``.
    """
    g = grad_at(x)
    for _ in range(int(steps)):
        step = step_at(x, g)
        t = 1.0
        for _ in range(int(halvings)):
            cand = x - t * step
            gc = grad_at(cand)
            if float(gc.norm()) < float(g.norm()):
                break
            t *= 0.5
        else:
            break
        x, g = cand, gc
    return x, g
