"""damped_newton: the one backtracking Newton loop (implicit forward solve, edit, retraining)."""

from __future__ import annotations

import torch

from metafluence.solvers import damped_newton


def _quartic(x: torch.Tensor) -> tuple[torch.Tensor, None]:
    """∇ of Σ (x⁴/4 + x²/2) = x³ + x (per row when batched); H = diag(3x² + 1)."""
    return x**3 + x, None


def _newton_step(x: torch.Tensor, g: torch.Tensor, _aux: None) -> torch.Tensor:
    return g / (3 * x**2 + 1)


def test_converges_and_counts_steps():
    x0 = torch.tensor([2.0, -1.5, 0.3], dtype=torch.float64)
    res = damped_newton(_quartic, _newton_step, x0, 50, tol=1e-12)
    assert float(res.grad_norm) <= 1e-12 and res.x.abs().max() < 1e-12
    assert 0 < res.steps < 50
    assert torch.equal(res.grad, _quartic(res.x)[0])


def test_batched_rows_freeze_independently():
    x0 = torch.tensor([[2.0, 1.0], [0.0, 0.0], [-3.0, 0.5]], dtype=torch.float64)
    res = damped_newton(_quartic, _newton_step, x0, 30, tol=1e-10, batched=True)
    assert res.grad_norm.shape == (3,)
    assert (res.grad_norm <= 1e-10).all()
    assert torch.equal(res.x[1], x0[1])  # already stationary: never moved
    one = damped_newton(_quartic, _newton_step, x0[2], 30, tol=1e-10)
    assert torch.equal(one.x, res.x[2])  # a row moves as it would alone


def test_no_decrease_freezes_or_accepts_last_trial():
    def uphill(x: torch.Tensor, g: torch.Tensor, _aux: None) -> torch.Tensor:
        return -g  # every trial step raises ‖∇‖

    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    stop = damped_newton(_quartic, uphill, x0, 5, trials=4)
    assert torch.equal(stop.x, x0) and stop.steps == 1
    take = damped_newton(_quartic, uphill, x0, 1, trials=4, accept_stalled=True)
    assert torch.equal(take.x, x0 + 2.0**-3 * _quartic(x0)[0])
