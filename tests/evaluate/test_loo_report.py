"""Ground truth that says what it is (issue 16, item 6d): ``newton_refine`` reports whether it
reached a converged minimum and never returns anything else silently; ``leave_one_out``
reports per item whether the retrain converged, to what gradient norm, and whether it ended on
a minimum — all checked against the dense Hessian."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf
from tests.toy_tasks import random_tasks

from ..influence.closed_form import ClosedForm, make_tasks
from ..influence.closed_form import problem as closed_problem


def dense_lambda_min(prob, lam, tasks) -> float:
    P = prob.flat(lam).numel()
    H = prob.point(lam, tasks).hvp(torch.eye(P, dtype=torch.float64), "exact")
    return float(torch.linalg.eigvalsh(0.5 * (H + H.T))[0])


@pytest.fixture(scope="module")
def saddle():
    """A bias-free tanh MLP meta-learned by one-step MAML: ``λ = 0`` is a stationary point of
    ``F`` (hidden units and logits vanish) and, with small damping, a saddle."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)
    ).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.5), damping=1e-3)
    tasks = random_tasks(6, 3)
    for t in tasks:  # float64 inputs
        t.support = (t.support[0].double(), t.support[1])
        t.query = (t.query[0].double(), t.query[1])
    zero = torch.zeros(prob.spec.size, dtype=torch.float64)
    return prob, tasks, zero


def test_zero_is_a_saddle(saddle):
    prob, tasks, zero = saddle
    assert float(prob.meta_grad(zero, tasks).norm()) < 1e-15
    assert dense_lambda_min(prob, zero, tasks) < -1e-3


def test_refine_on_a_quadratic_reports_a_converged_minimum():
    tasks = make_tasks(8, d=4, seed=3)
    cf = ClosedForm(tasks, 1.0, 0.01)
    prob = closed_problem(4, 1.0, 0.01)
    info: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged minimum: no warning
        # (torch's own deprecation notice when a first forward-mode product loads its
        # decompositions is not ours: without this the test depended on the test order)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        out = mf.train.newton_refine(prob, torch.zeros(4, dtype=torch.float64), tasks, info=info)
    assert float((prob.flat(out) - cf.minimiser()).norm()) < 1e-10
    assert info["converged"] and info["minimum"] and info["stop"] == "tol"
    assert info["grad_norm"] <= 1e-12 and info["fixed_steps"] == 0
    lam_min = float(torch.linalg.eigvalsh(cf.hessian(cf.minimiser()))[0])
    assert info["lambda_min"] == pytest.approx(lam_min, rel=1e-8)


def test_refine_never_returns_an_unconverged_point_silently(saddle):
    prob, tasks, zero = saddle
    start = 0.3 * torch.randn(zero.shape, generator=torch.Generator().manual_seed(1)).double()
    info: dict = {}
    with pytest.warns(RuntimeWarning, match="not a converged minimum"):
        mf.train.newton_refine(prob, start, tasks, max_steps=1, info=info)
    assert not info["converged"] and info["stop"] == "max_steps" and info["steps"] == 1
    assert info["grad_norm"] == pytest.approx(
        float(
            prob.meta_grad(  # the point returned
                mf.train.newton_refine(prob, start, tasks, max_steps=1, warn=False), tasks
            ).norm()
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mf.train.newton_refine(prob, start, tasks, max_steps=1, warn=False)  # caller reports


def test_refine_at_a_saddle_says_it_is_not_a_minimum(saddle):
    prob, tasks, zero = saddle
    info: dict = {}
    with pytest.warns(RuntimeWarning, match="NOT a minimum"):
        mf.train.newton_refine(prob, zero, tasks, info=info)
    assert info["converged"] and not info["minimum"]
    assert info["lambda_min"] == pytest.approx(dense_lambda_min(prob, zero, tasks), rel=1e-8)


def test_refine_near_a_saddle_descends_to_a_minimum(saddle):
    """Newton on ‖∇F‖ is attracted by the saddle at 0; the eigenvalue fix descends F to a
    minimum instead."""
    prob, tasks, zero = saddle
    start = 1e-3 * torch.randn(zero.shape, generator=torch.Generator().manual_seed(2)).double()
    info: dict = {}
    out = prob.flat(mf.train.newton_refine(prob, start, tasks, max_steps=60, info=info))
    assert info["converged"] and info["minimum"] and info["fixed_steps"] >= 1, info
    assert info["lambda_min"] == pytest.approx(dense_lambda_min(prob, out, tasks), rel=1e-6)
    f = float(prob.point(out, tasks).objective())
    assert f < float(prob.point(zero, tasks).objective()) - 1e-3


def test_leave_one_out_reports_each_retrain_against_the_dense_hessian(saddle):
    prob, tasks, zero = saddle
    start = 1e-3 * torch.randn(zero.shape, generator=torch.Generator().manual_seed(2)).double()
    lam = mf.train.newton_refine(prob, start, tasks, max_steps=60)
    target = random_tasks(3, 9)
    for t in target:
        t.support = (t.support[0].double(), t.support[1])
        t.query = (t.query[0].double(), t.query[1])
    details: list = []
    df = mf.evaluate.leave_one_out(prob, lam, tasks, target, indices=[0, 2, 5], details=details)
    base = prob.batch(tasks, prob.flat(lam))
    for d, v in zip(details, df.tolist(), strict=True):
        assert set(d) >= {"item", "df", "grad_norm", "converged", "lambda_min", "minimum"}
        assert d["df"] == v and d["steps"] >= 1
        # what leave_one_out says about the retrain, recomputed: re-run the retrainer
        info: dict = {}
        without = base.reweighted({"task": [d["item"]]}, 0.0)
        new = mf.train.newton_refine(prob, lam, without, info=info, warn=False)
        assert d["grad_norm"] == pytest.approx(
            float(prob.meta_grad(new, without).norm()), abs=1e-15
        )
        assert d["converged"] == (d["grad_norm"] <= 1e-6)
        assert d["lambda_min"] == pytest.approx(dense_lambda_min(prob, new, without), rel=1e-6)
        assert d["minimum"] == (d["lambda_min"] > 0)


def test_leave_one_out_flags_retrains_that_end_off_a_minimum(saddle):
    """A retrainer that returns the saddle (a stationary point of every F_-e here): converged,
    but not a minimum — Lanczos bounds on the Hessian there say so, per item."""
    prob, tasks, zero = saddle
    details: list = []
    with pytest.warns(RuntimeWarning, match="ended off a minimum"):
        mf.evaluate.leave_one_out(
            prob,
            zero,
            tasks,
            random_tasks(2, 9),
            indices=[1, 4],
            retrain=lambda batch: prob.unflat(zero),
            details=details,
        )
    for d in details:
        assert d["converged"] and d["minimum"] is False
        assert d["lambda_min"] < 0 and "steps" not in d
    quiet: list = []
    mf.evaluate.leave_one_out(
        prob,
        zero,
        tasks,
        random_tasks(2, 9),
        indices=[1],
        check_minimum=False,
        retrain=lambda batch: prob.unflat(zero),
        details=quiet,
    )
    assert quiet[0]["minimum"] is None
    with pytest.raises(TypeError, match="check_minimum"):
        mf.evaluate.leave_one_out(prob, zero, tasks, random_tasks(2, 9), check_minimum="yes")


def test_stationary_retrain_is_converged_ground_truth():
    """``stationary_retrain`` (warm L-BFGS to the tolerance, for any P) gives the exact
    leave-one-out Δf of a quadratic meta-objective (dense Newton's, the closed form's), and
    says per item how far it got."""
    tasks = make_tasks(8, d=4, seed=3)
    cf = ClosedForm(tasks, 1.0, 0.01)
    prob = closed_problem(4, 1.0, 0.01)
    lam = cf.minimiser()
    target = make_tasks(3, d=4, seed=4)
    newton = mf.evaluate.leave_one_out(prob, lam, tasks, target, indices=[0, 2, 5])
    details: list = []
    lbfgs = mf.evaluate.leave_one_out(
        prob, lam, tasks, target, indices=[0, 2, 5], details=details, stationary_tol=1e-10,
        retrain=mf.evaluate.stationary_retrain(prob, tol=1e-10, max_evals=200),
    )  # fmt: skip
    assert float((lbfgs - newton).norm()) <= 1e-7 * float(newton.norm())
    for d in details:
        assert d["converged"] and d["grad_norm"] <= 1e-10 and d["steps"] >= 2
        assert d["minimum"] is True and d["lambda_min"] > 0  # Lanczos bounds, certified
    # an evaluation budget too small: reported unconverged, with its gradient norm
    short: list = []
    with pytest.warns(RuntimeWarning, match="did not reach"):
        mf.evaluate.leave_one_out(
            prob, lam, tasks, target, indices=[0], details=short, stationary_tol=1e-10,
            retrain=mf.evaluate.stationary_retrain(prob, tol=1e-10, max_evals=2),
            check_minimum=False,
        )  # fmt: skip
    assert not short[0]["converged"] and short[0]["grad_norm"] > 1e-10 and short[0]["steps"] == 2
