"""Lanczos bounds on the extreme eigenvalues (solvers/eigen.py::lanczos_eigen_bounds), against
the dense spectrum."""

from __future__ import annotations

import math

import pytest
import torch

from metafluence.solvers import lanczos_eigen_bounds, lanczos_extreme_eigenvalues

from ._helpers import row_matvec, spd


@pytest.mark.parametrize("cond", [1e2, 2.3e3, 1e4])
@pytest.mark.parametrize("steps", [10, 20, 40, 80])
def test_bounds_enclose_the_dense_extremes(cond: float, steps: int) -> None:
    P = 100
    A, _, ev = spd(P, cond, seed=11, lam_max=2.0)
    lo_true, hi_true = float(ev.min()), float(ev.max())
    for seed in range(3):
        b = lanczos_eigen_bounds(row_matvec(A), P, steps=steps, seed=seed)
        assert b.steps == steps and not b.exact
        assert b.lambda_min_lower <= lo_true <= b.lambda_min * (1 + 1e-12)
        assert b.lambda_max * (1 - 1e-12) <= hi_true <= b.lambda_max_upper
        k_lo, k_hi = b.condition_bounds()
        assert k_lo <= cond * (1 + 1e-9) and k_hi >= cond * (1 - 1e-9)


def test_few_steps_overstate_lambda_min_and_the_bound_says_so() -> None:
    """The failure of issue 16: 20 steps put the Ritz ratio of a κ = 2.3e3 operator under 1e3;
    the lower bound on λ_min is then not positive, so nothing is certified."""
    P = 300
    A, _, ev = spd(P, 2.3e3, seed=5, lam_max=2.0)
    b = lanczos_eigen_bounds(row_matvec(A), P, steps=20)
    assert b.lambda_max / b.lambda_min < 1e3  # what the old label read
    assert b.condition_bounds()[1] == math.inf
    more = lanczos_eigen_bounds(row_matvec(A), P, steps=20, max_steps=160, decided=lambda _: False)
    assert more.steps == 160 and more.lambda_max / more.lambda_min > 2.2e3


def test_extension_continues_the_same_krylov_sequence() -> None:
    P = 90
    A, _, _ = spd(P, 1e3, seed=12)
    calls = []

    def mv(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return A @ v

    grown = lanczos_eigen_bounds(mv, P, steps=10, max_steps=40, decided=lambda _: False)
    assert grown.steps == 40 and len(calls) == 40  # 10 + 10 + 20: no product repeated
    once = lanczos_eigen_bounds(row_matvec(A), P, steps=40, max_steps=40)
    assert grown.lambda_min == pytest.approx(once.lambda_min, rel=1e-12)
    assert grown.lambda_max == pytest.approx(once.lambda_max, rel=1e-12)
    stop = lanczos_eigen_bounds(row_matvec(A), P, steps=10, max_steps=40, decided=lambda _: True)
    assert stop.steps == 10


def test_full_steps_are_exact_and_agree_with_extreme_eigenvalues() -> None:
    P = 40
    A, _, ev = spd(P, 1e4, seed=13)
    b = lanczos_eigen_bounds(row_matvec(A), P, steps=P)
    assert b.exact and b.eps == 0.0
    assert b.lambda_min_lower == b.lambda_min == pytest.approx(float(ev.min()), rel=1e-8)
    assert b.lambda_max_upper == b.lambda_max == pytest.approx(float(ev.max()), rel=1e-12)
    lo, hi = lanczos_extreme_eigenvalues(row_matvec(A), P, steps=P)
    assert lo == pytest.approx(b.lambda_min, rel=1e-8) and hi == pytest.approx(b.lambda_max)


def test_indefinite_is_certain() -> None:
    P = 50
    A, Q, ev = spd(P, 1e2, seed=14)
    A = A - 0.5 * float(ev.min()) * torch.eye(P, dtype=A.dtype) * 3  # shift below zero
    b = lanczos_eigen_bounds(row_matvec(A), P, steps=P)
    assert b.lambda_min < 0 and b.condition_bounds() == (math.inf, math.inf)


def test_bad_arguments_are_named() -> None:
    A, _, _ = spd(10, 10.0)
    with pytest.raises(ValueError, match="max_steps"):
        lanczos_eigen_bounds(row_matvec(A), 10, steps=5, max_steps=3)
    with pytest.raises(ValueError, match="failure_probability"):
        lanczos_eigen_bounds(row_matvec(A), 10, failure_probability=1.0)
    with pytest.raises(ValueError, match="steps"):
        lanczos_eigen_bounds(row_matvec(A), 10, steps=0)
