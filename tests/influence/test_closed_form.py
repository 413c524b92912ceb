"""Closed-form toy: every quantity equals an independent dense computation (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch

import metafluence as mf

from .closed_form import ClosedForm, make_tasks, problem

D, REG, DAMP = 5, 1.0, 0.01


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def setup():
    tasks = make_tasks(40, d=D, seed=1)
    target = make_tasks(15, d=D, seed=2)
    cf = ClosedForm(tasks, REG, DAMP)
    cf_t = ClosedForm(target, REG, 0.0)
    lam = cf.minimiser()
    return tasks, target, cf, cf_t, lam


@pytest.mark.parametrize("solver", ["direct", "cg", "woodbury"])
def test_gradient_and_hvp_match_closed_form(setup, solver):
    tasks, _, cf, _, lam = setup
    prob = problem(D, REG, DAMP, solver)
    lam1 = lam + 0.3 * torch.randn(
        D, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    pt = prob.point(lam1, tasks)
    assert rel(pt.meta_grad(), cf.grad(lam1)) < 1e-8
    assert rel(pt.task_losses(), cf.task_losses(lam1, cf.W, cf.V)) < 1e-10
    H = cf.hessian(lam1)
    V = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for curv in ("exact", "gauss_newton"):  # θ is linear in λ and the model linear: GN = exact
        assert rel(pt.hvp(V, curv), V @ H) < 1e-8
    gamma = pt.gamma_constant()
    assert gamma > 0
    assert rel(pt.hvp(V, "gamma"), V @ H + gamma * V) < 1e-8


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_removal_effects_match_closed_form(setup, solver):
    tasks, target, cf, cf_t, lam = setup
    prob = problem(D, REG, DAMP, solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(prob, lam, tasks, target=target, items="task", solver="direct")
    grad_f = torch.func.grad(lambda x: cf_t.F(x))(lam)
    s = torch.linalg.solve(cf.hessian(lam), grad_f)
    t_cf, w_cf, v_cf = cf.scores(lam, s)
    assert rel(res.solve.x, s) < 1e-8
    assert rel(res.scores, t_cf) < 1e-8
    assert rel(torch.stack(res.all_scores["support_point"]), w_cf) < 1e-8
    assert rel(torch.stack(res.all_scores["query_point"]), v_cf) < 1e-8
    assert res.meta_grad_norm < 1e-10
    assert res.diagnostics["regime"] == "well_conditioned"


def test_param_influence_is_newton_step(setup):
    tasks, _, cf, _, lam = setup
    prob = problem(D, REG, DAMP)
    H = cf.hessian(lam)
    for group in ([3], [5, 17, 30]):
        delta = mf.param_influence(prob, lam, tasks, remove={"task": group}, solver="direct")
        c = cf.c.clone()
        c[group] = 0
        # ω ∂_ω ∇F summed over the group = ∇F(λ*) − ∇F_{-R}(λ*)
        b = cf.grad(lam) - torch.func.grad(lambda x: cf.F(x, c))(lam)
        expected = torch.linalg.solve(H, b)
        assert rel(prob.spec.flatten(delta), expected) < 1e-8
        edited = mf.edit(prob, lam, tasks, remove={"task": group}, solver="direct")
        assert rel(prob.spec.flatten(edited), lam + expected) < 1e-8


def test_point_scores_param_influence(setup):
    tasks, _, cf, _, lam = setup
    prob = problem(D, REG, DAMP)
    H = cf.hessian(lam)
    dW = torch.zeros_like(cf.W)
    dW[2, 4] = cf.W[2, 4]
    dV = torch.zeros_like(cf.V)
    dV[7, 1] = cf.V[7, 1]
    # ω ∂_ω ∇F: a directional derivative in the weights (F is nonlinear in W)
    _, b = torch.func.jvp(
        lambda W, V: torch.func.grad(lambda x: cf.F(x, None, W, V))(lam), (cf.W, cf.V), (dW, dV)
    )
    delta = mf.param_influence(
        prob,
        lam,
        tasks,
        remove={"support_point": [(2, 4)], "query_point": [(7, 1)]},
        solver="direct",
        support_response="linear",  # the weight derivative (default for support: the exact change)
    )
    assert rel(prob.spec.flatten(delta), torch.linalg.solve(H, b)) < 1e-8


@pytest.mark.parametrize("M,bound", [(200, 0.10), (800, 0.02)])
def test_task_removal_tracks_exact_leave_one_out(M, bound):
    tasks = make_tasks(M, d=D, seed=3)
    target = make_tasks(20, d=D, seed=4)
    cf, cf_t = ClosedForm(tasks, REG, DAMP), ClosedForm(target, REG, 0.0)
    lam = cf.minimiser()
    prob = problem(D, REG, DAMP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(prob, lam, tasks, target=target, solver="direct")
    f0 = cf_t.F(lam)
    true = torch.func.vmap(cf_t.F)(cf.loo_minimisers()) - f0
    stats = mf.evaluate.correlation(res.scores, true)
    print(f"M={M}: rel error {stats['rel_error']:.4f}, spearman {stats['spearman']:.4f}")
    assert stats["rel_error"] <= bound
    assert stats["spearman"] >= 0.99


def test_leave_one_out_api_matches_closed_form(setup):
    tasks, target, cf, cf_t, lam = setup
    prob = problem(D, REG, DAMP)
    truth = torch.func.vmap(cf_t.F)(cf.loo_minimisers()) - cf_t.F(lam)
    idx = [0, 5, 9]
    # api.md form: retrain(batch) -> params (here: Newton from λ*, exact on a quadratic)
    got = mf.evaluate.leave_one_out(
        prob,
        lam,
        tasks,
        target,
        indices=idx,
        retrain=lambda batch: mf.train.newton_refine(prob, lam, batch),
    )
    assert rel(got, truth[idx]) < 1e-8
    default = mf.evaluate.leave_one_out(prob, lam, tasks, target, indices=idx)
    assert rel(default, truth[idx]) < 1e-8


def test_newton_corrected_edit_is_exact_retraining_on_quadratic(setup):
    tasks, _, cf, _, lam = setup
    prob = problem(D, REG, DAMP)
    c = cf.c.clone()
    c[[4, 11]] = 0
    new = mf.edit(prob, lam, tasks, remove={"task": [4, 11]}, solver="direct", newton_steps=1)
    assert rel(prob.spec.flatten(new), cf.minimiser(c)) < 1e-8
