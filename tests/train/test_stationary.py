"""The stationarity phase: full-batch L-BFGS to ‖∇F‖ ≤ tol, reported, within its budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from tests.toy_tasks import random_tasks


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=1e-2)
    return prob, model, random_tasks(8, 0)


def test_reaches_the_tolerance_and_reports_it(setup):
    prob, model, tasks = setup
    info: dict = {}
    first = mf.train.meta_train(prob, model, tasks, steps=15, outer_lr=0.05)
    lam = mf.train.meta_train(
        prob, model, tasks, steps=15, outer_lr=0.05, stationary_tol=1e-8, info=info
    )
    rep = info["stationarity"]
    before = mf.train.grad_norm(prob, first, tasks)
    after = mf.train.grad_norm(prob, lam, tasks)
    assert rep["grad_norm_before"] == pytest.approx(before, rel=1e-12) and before > 1e-3
    assert after <= 1e-8 and rep["converged"] and rep["grad_norm_after"] == pytest.approx(after)
    assert rep["objective_after"] < rep["objective_before"]
    assert 1 < rep["evaluations"] <= 200 and rep["seconds"] > 0
    line = mf.train.StationarityReport(**rep).line()
    assert "reached" in line and "NOT" not in line


def test_budget_is_kept_and_shortfall_reported(setup):
    prob, model, tasks = setup
    lam0 = mf.train.meta_train(prob, model, tasks, steps=5, outer_lr=0.05)
    calls = []
    real = mf.MetaProblem.point

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mf.MetaProblem, "point", counted)
        lam, rep = mf.train.make_stationary(prob, lam0, tasks, tol=1e-14, max_evals=7)
    assert rep.evaluations <= 7 and len(calls) == rep.evaluations
    assert not rep.converged and "NOT reached" in rep.line()
    assert rep.grad_norm_after == pytest.approx(mf.train.grad_norm(prob, lam, tasks))


def test_arguments_are_named(setup):
    prob, model, tasks = setup
    with pytest.raises(ValueError, match="stationary_tol"):
        mf.train.meta_train(prob, model, tasks, steps=1, stationary_tol=0.0)
    with pytest.raises(TypeError, match="stationary_evals"):
        mf.train.meta_train(prob, model, tasks, steps=1, stationary_tol=1e-3, stationary_evals=2.5)


def test_return_last_gives_the_lowest_objective(setup):
    """``return_best=False`` (ground-truth retrains) returns the last accepted iterate: the
    lowest ``F`` the budget reached, reported honestly; the default returns the most
    stationary one. Along one run they differ whenever ‖∇F‖ was not monotone."""
    prob, model, tasks = setup
    lam0 = mf.train.meta_train(prob, model, tasks, steps=5, outer_lr=0.05)

    def last_of(n: int):
        return mf.train.make_stationary(
            prob, lam0, tasks, tol=1e-14, max_evals=n, return_best=False
        )[0]

    objective = [float(prob.point(last_of(n), tasks).objective()) for n in (3, 6, 19)]
    assert objective[0] >= objective[1] >= objective[2]  # F falls with the budget
    # at 19 evaluations the last iterate has a larger ‖∇F‖ than an earlier one
    best, rb = mf.train.make_stationary(prob, lam0, tasks, tol=1e-14, max_evals=19)
    last, rl = mf.train.make_stationary(
        prob, lam0, tasks, tol=1e-14, max_evals=19, return_best=False
    )
    assert rl.objective_after < rb.objective_after - 1e-3
    assert rl.objective_after == pytest.approx(objective[2], rel=1e-12)
    assert rl.objective_after <= rb.objective_after
    assert rl.grad_norm_after == pytest.approx(mf.train.grad_norm(prob, last, tasks), rel=1e-10)
    assert rb.grad_norm_after <= rl.grad_norm_after
