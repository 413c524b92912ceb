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


def _normed(norm: bool) -> nn.Module:
    """``body.0: Linear → GroupNorm → Tanh → head``: ``body.0`` is scale-invariant with the
    norm (ANIL adapts only the head, so the inner step keeps the invariance; ``eps`` ≈ 0 makes
    the invariance exact)."""
    from collections import OrderedDict

    torch.manual_seed(1)
    body = nn.Sequential(
        nn.Linear(3, 6), nn.GroupNorm(2, 6, eps=1e-12) if norm else nn.Identity(), nn.Tanh()
    )
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(6, 2))).double()


@pytest.mark.parametrize("damping", [1e-2, 0.3])
def test_radial_floor_of_a_normalised_block(damping):
    """‖∇F‖ ≥ δ‖w‖ for a block a normalisation follows: the gradient's radial part on it is
    exactly the damping's (Euler: ⟨w, ∇L⟩ = 0), so the phase cannot pass the floor and says so."""
    import warnings

    model = _normed(True)
    prob = mf.MetaProblem(
        model, inner=mf.inner.HeadOnly(head="head", steps=1, lr=0.3), damping=damping
    )
    tasks = random_tasks(8, 0)
    lam = prob.flat(prob.init_params())
    g = prob.meta_grad(lam, tasks)
    spec = prob.spec
    w = torch.cat([lam[s] for s in _slices(spec, "body.0.")])
    gw = torch.cat([g[s] for s in _slices(spec, "body.0.")])
    assert float(w @ gw) / float(w.norm()) == pytest.approx(damping * float(w.norm()), rel=1e-6)
    floor, blocks = mf.train.radial_floor(prob, lam, prob.batch(tasks, lam), grad=g)
    assert blocks == ("body.0",) and floor == pytest.approx(damping * float(w.norm()), rel=1e-12)
    with pytest.warns(UserWarning, match="Scale-invariant block") as got:
        out, rep = mf.train.make_stationary(prob, lam, tasks, tol=1e-10, max_evals=60)
    assert rep.scale_invariant == ("body.0",) and rep.grad_norm_after >= rep.radial_floor > 0
    # either the floor is above tol, or tol was met only by scaling the block away (w → 0)
    said = str(got[0].message)
    if rep.converged:
        assert "shrank them from a floor of" in said and rep.radial_floor <= 1e-10
        assert _norm_of(prob.flat(out), spec, "body.0.") < 1e-6 * float(w.norm())
    else:
        assert "cannot be reached" in said and rep.radial_floor >= 1e-10
    assert rep.radial_floor == pytest.approx(damping * _norm_of(prob.flat(out), spec, "body.0."))
    assert "scale-invariant" in rep.line() and "body.0" in rep.line()
    # a tolerance the floor never binds: no warning (retrains from λ* at the job's tolerance)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, loose = mf.train.make_stationary(prob, lam, tasks, tol=10 * rep.grad_norm_before)
    assert loose.converged and loose.scale_invariant == ("body.0",)
    assert rep.as_dict()["radial_floor"] == rep.radial_floor


def test_no_floor_without_the_normalisation(setup):
    """The same model without the norm (and the fixture's tanh MLP) has no scale-invariant
    block: no floor, no warning, and the phase reaches a tight tolerance."""
    import warnings

    prob = mf.MetaProblem(
        _normed(False), inner=mf.inner.HeadOnly(head="head", steps=1, lr=0.3), damping=1e-2
    )
    tasks = random_tasks(8, 0)
    lam = prob.flat(prob.init_params())
    g = prob.meta_grad(lam, tasks)
    assert mf.train.radial_floor(prob, lam, prob.batch(tasks, lam), grad=g) == (0.0, ())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = mf.train.make_stationary(prob, lam, tasks, tol=1e-8, max_evals=300)
    assert rep.converged and rep.radial_floor == 0.0 and rep.scale_invariant == ()
    prob2, _, tasks2 = setup
    lam2 = prob2.flat(prob2.init_params())
    g2 = prob2.meta_grad(lam2, tasks2)
    assert mf.train.radial_floor(prob2, lam2, prob2.batch(tasks2, lam2), grad=g2) == (0.0, ())


def test_a_radial_coincidence_alone_is_not_a_floor():
    """A gradient whose radial part on a block equals δ‖w‖ (here forged) does not make the block
    scale-invariant: the outputs must also stay put when it is doubled (the guard), which they do
    with the norm and do not without it."""
    for norm, expect in ((True, ("body.0",)), (False, ())):
        prob = mf.MetaProblem(
            _normed(norm), inner=mf.inner.HeadOnly(head="head", steps=1, lr=0.3), damping=1e-2
        )
        tasks = random_tasks(8, 0)
        lam = prob.flat(prob.init_params())
        forged = torch.zeros_like(lam)
        for s in _slices(prob.spec, "body.0."):
            forged[s] = prob.damping * lam[s]  # radial part exactly δ‖w‖, nothing else
        floor, blocks = mf.train.radial_floor(prob, lam, prob.batch(tasks, lam), grad=forged)
        assert blocks == expect and (floor > 0) == norm


def _slices(spec, prefix: str) -> list[slice]:
    out, k = [], 0
    for name, shape in zip(spec.names, spec.shapes, strict=True):
        n = int(torch.Size(shape).numel())
        if name.startswith(prefix):
            out.append(slice(k, k + n))
        k += n
    return out


def _norm_of(lam, spec, prefix: str) -> float:
    return float(torch.cat([lam[s] for s in _slices(spec, prefix)]).norm())
