"""Exact support-point responses and the Newton regime check (influence/support.py, regime.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.data.source import TaskSource
from metafluence.influence.regime import (
    RETRAIN_RESIDUAL,
    TRACK_BELOW,
    checked_items,
    expected_spearman,
    is_nonlinear,
    predict_spearman,
)
from tests.toy_tasks import random_tasks

from .closed_form import ClosedForm, make_tasks, problem

D, REG, DAMP = 5, 1.0, 0.01


def rel(a, b):
    return float((a - b).norm() / b.norm())


def quiet_effects(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.removal_effects(*args, **kw)


@pytest.fixture(scope="module")
def closed():
    tasks = make_tasks(12, d=D, seed=1)
    target = make_tasks(6, d=D, seed=2)
    cf, cf_t = ClosedForm(tasks, REG, DAMP), ClosedForm(target, REG, 0.0)
    return tasks, target, cf, cf_t, cf.minimiser()


def _without(cf, e):
    k, j = e
    W = cf.W.clone()
    W[k, j] = 0
    return W


def test_exact_support_scores_equal_newton_step_with_exact_gradient(closed):
    tasks, target, cf, cf_t, lam = closed
    res = quiet_effects(
        problem(D, REG, DAMP),
        lam,
        tasks,
        target=target,
        items="support_point",
        solver="direct",
        support_response="exact",
    )
    s = torch.linalg.solve(cf.hessian(lam), torch.func.grad(cf_t.F)(lam))
    got = torch.stack(res.scores)
    want = torch.zeros_like(got)
    for k in range(got.shape[0]):
        for j in range(got.shape[1]):
            Wk = _without(cf, (k, j))
            g_without = torch.func.grad(lambda x, W=Wk: cf.F(x, W=W))(lam)
            want[k, j] = -(s @ g_without)  # Δf ≈ −⟨s, ∇F_{-e}(λ*)⟩, ∇F(λ*) = 0
    assert rel(got, want) < 1e-8
    # tasks and query points are linear in their weights: unchanged
    lin = quiet_effects(problem(D, REG, DAMP), lam, tasks, target=target, solver="direct")
    assert rel(res.all_scores["task"], lin.all_scores["task"]) < 1e-12
    assert (
        rel(torch.stack(res.all_scores["query_point"]), torch.stack(lin.all_scores["query_point"]))
        < 1e-12
    )


def test_exact_support_response_tracks_retraining_better(closed):
    """Against actual retraining without each support point (closed-form minimiser)."""
    tasks, target, cf, cf_t, lam = closed
    prob = problem(D, REG, DAMP)
    scores = {
        r: torch.stack(
            quiet_effects(
                prob,
                lam,
                tasks,
                target=target,
                items="support_point",
                solver="direct",
                support_response=r,
            ).scores
        )
        for r in ("linear", "exact")
    }
    truth = torch.zeros_like(scores["exact"])
    lam0 = torch.zeros(D, dtype=torch.float64)
    for k in range(truth.shape[0]):
        for j in range(truth.shape[1]):
            W = _without(cf, (k, j))
            H = torch.func.hessian(lambda x, W=W: cf.F(x, W=W))(lam0)
            g0 = torch.func.grad(lambda x, W=W: cf.F(x, W=W))(lam0)
            truth[k, j] = cf_t.F(torch.linalg.solve(H, -g0)) - cf_t.F(lam)
    err = {r: rel(v, truth) for r, v in scores.items()}
    assert err["exact"] < 0.7 * err["linear"], err
    rho = mf.evaluate.correlation(scores["exact"].flatten(), truth.flatten())["spearman"]
    assert rho > 0.99, rho


def _mlp_problem(inner, damping=1e-1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return model, mf.MetaProblem(model, inner=inner, damping=damping, chunk_size=3)


@pytest.mark.parametrize(
    "inner",
    [
        mf.inner.Unrolled(steps=2, lr=0.3),
        mf.inner.Implicit(reg=2.0, steps=5, lr=0.2, newton_steps=8),
    ],
    ids=["unrolled", "implicit"],
)
def test_exact_support_scores_streamed_and_brute_force(inner):
    model, prob = _mlp_problem(inner)
    tr, tg = random_tasks(7, 0, prefix="t"), random_tasks(3, 9, prefix="t")
    # any λ will do: both sides use the same solve s (training the implicit map is slow)
    lam = prob.init_params()
    kw = dict(
        target=tg,
        items="support_point",
        solver="direct",
        support_response="exact",
        diagnostics=False,  # a streamed implicit map re-solves every task on every pass
    )
    mem = quiet_effects(prob, lam, tr, **kw)
    src = quiet_effects(prob, lam, TaskSource(tr), **kw)
    assert rel(torch.stack(src.scores), torch.stack(mem.scores)) < 1e-10
    L, s = prob.flat(lam), mem.solve.x
    base = prob.batch(tr, L)
    g = prob.point(L, base).meta_grad()
    for k, j in [(0, 0), (3, 2), (6, 3)]:
        b = g - prob.point(L, base.reweighted({"support_point": [(k, j)]})).meta_grad()
        assert abs(float(s @ b) - float(mem.scores[k][j])) <= 1e-10 * float(s.abs().max())


def test_checked_items_spread_over_the_ranking():
    s = torch.tensor([5.0, -1.0, 3.0, 0.0, 2.0])
    assert checked_items(s, "task", 3) == [1, 4, 0]  # min, median, max
    assert sorted(checked_items(s, "task", 8)) == [0, 1, 2, 3, 4]
    assert checked_items(s, "task", 0) == []
    pts = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 9.0])]
    assert checked_items(pts, "support_point", 2) == [(0, 1), (1, 1)]


def test_quadratic_problem_is_linear_regime(closed):
    tasks, target, cf, _, lam = closed
    res = quiet_effects(
        problem(D, REG, DAMP), lam, tasks, target=target, solver="direct", newton_check=8
    )
    chk = res.diagnostics["newton_check"]
    assert res.diagnostics["regime"] == "linear"
    assert len(chk["items"]) == 8 and chk["shift"] < 0.2
    off = quiet_effects(problem(D, REG, DAMP), lam, tasks, target=target, solver="direct")
    assert "newton_check" not in off.diagnostics
    assert off.diagnostics["regime"] == "well_conditioned"


def test_newton_check_retrains_like_leave_one_out():
    """A nonlinear problem (8 tasks: each removal is 1/8 of the data): the check's Newton
    retrains are closer to actual leave-one-out retraining than first order, and the regime
    follows its statistic."""
    model, prob = _mlp_problem(mf.inner.Unrolled(steps=1, lr=0.5), damping=1e-2)
    tr, tg = random_tasks(8, 4, prefix="t"), random_tasks(4, 9, prefix="t")
    lam = mf.train.meta_train(prob, model, tr, steps=300, outer_lr=0.05)
    lam = mf.train.newton_refine(prob, lam, tr, tol=1e-12, max_steps=40)
    res = quiet_effects(prob, lam, tr, target=tg, solver="direct", newton_check=8)
    chk = res.diagnostics["newton_check"]
    items = chk["items"]
    details: list = []
    truth = mf.evaluate.leave_one_out(prob, lam, tr, tg, indices=items, details=details)
    first = torch.tensor(chk["first_order"], dtype=torch.float64)
    retrained = torch.tensor(chk["retrained"], dtype=torch.float64)
    assert torch.allclose(first, res.scores[items], rtol=1e-8, atol=1e-14)
    # two backtracking Newton steps get most of the way on removals this large, where the refit
    # is a local continuation of λ*; refits that need eigenvalue-fixed steps (here 4 of 8, one
    # with 17) end at minima the check's two steps do not reach (leave_one_out flags them)
    local = torch.tensor([d["fixed_steps"] == 0 for d in details])
    assert int(local.sum()) >= 3, details
    first, retrained, truth = first[local], retrained[local], truth[local]
    assert rel(retrained, truth) < 0.7 * rel(first, truth), (
        rel(retrained, truth),
        rel(first, truth),
    )
    assert float(torch.tensor(chk["residual"]).median()) < 0.2
    assert res.diagnostics["lambda_min"] > 0
    assert chk["nonlinear"] == is_nonlinear(chk["expected_spearman"], chk["residual"])
    assert chk["retrains_unfinished"] == sum(r > RETRAIN_RESIDUAL for r in chk["residual"])
    assert res.diagnostics["regime"] == ("nonlinear" if chk["nonlinear"] else "linear")


def test_bad_arguments_are_named(closed):
    tasks, target, _, _, lam = closed
    with pytest.raises(ValueError, match="support_response"):
        mf.removal_effects(problem(D, REG, DAMP), lam, tasks, target=target, support_response="x")
    with pytest.raises(ValueError, match="newton_check"):
        mf.removal_effects(problem(D, REG, DAMP), lam, tasks, target=target, newton_check=-1)


def test_param_influence_support_points_exact_newton_step(closed):
    tasks, _, cf, _, lam = closed
    prob = problem(D, REG, DAMP)
    group = [(0, 1), (3, 2), (3, 4)]
    W = cf.W.clone()
    for k, j in group:
        W[k, j] = 0
    b = cf.grad(lam) - torch.func.grad(lambda x: cf.F(x, W=W))(lam)
    want = torch.linalg.solve(cf.hessian(lam), b)
    got = mf.param_influence(prob, lam, tasks, remove={"support_point": group}, solver="direct")
    assert rel(prob.spec.flatten(got), want) < 1e-8
    lin = mf.param_influence(
        prob,
        lam,
        tasks,
        remove={"support_point": group},
        solver="direct",
        support_response="linear",
    )
    assert rel(prob.spec.flatten(lin), want) > 1e-3  # the derivative is not the exact change
    with pytest.raises(ValueError, match="support_response"):
        mf.param_influence(prob, lam, tasks, remove={"task": [0]}, support_response="nope")


def test_expected_spearman_of_exact_retraining_is_one():
    scores = torch.arange(10, dtype=torch.float64)  # ranks 0..9
    assert expected_spearman(scores, scores[[0, 5, 9]], scores[[0, 5, 9]]) == 1.0


def test_one_opposite_sign_item_does_not_reverse_the_prediction():
    """The former estimator fitted a least-squares scale: one checked item whose retrained effect
    had the opposite sign made it negative and the prediction about −1."""
    scores = torch.linspace(-1, 1, 20, dtype=torch.float64) ** 3
    first = scores[[0, 5, 10, 14, 19]]
    retrained = first.clone()
    retrained[0] = 3.0  # the most "harmful" item actually helps, by a lot
    pred = predict_spearman(scores, first, retrained)
    assert pred.scale > 0 and 0.3 < pred.estimate < 0.95, pred


@pytest.mark.parametrize(("noise", "tol"), [(0.05, 0.02), (0.3, 0.08), (1.0, 0.25)])
def test_predicted_spearman_tracks_a_known_noise_model(noise, tol):
    """Retrained values ``y = x + noise·(|x| + 0.3)·ε``: from 16 checked items of 200 the
    prediction is within ``tol`` of the Spearman of all of them (true 0.999 / 0.958 / 0.627;
    the former estimator, which ignored the other items' errors and fitted a least-squares
    scale, predicted 0.997 / 0.831 / −0.168 from the same items). With 16 items the prediction
    is a sample: its error grows with the noise."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, generator=g, dtype=torch.float64)
    y = x + noise * (x.abs() + 0.3) * torch.randn(200, generator=g, dtype=torch.float64)
    idx = checked_items(x, "task", 16)
    pred = predict_spearman(x, x[idx], y[idx])
    true = float(mf.evaluate.correlation(x, y)["spearman"])
    assert abs(pred.estimate - true) < tol, (pred, true)
    assert pred.low <= pred.estimate <= pred.high


def test_check_calls_removals_nonlinear_when_half_the_retrains_did_not_finish():
    """The verdict: below the expected-ρ line, or (whatever ρ is expected) when at least half
    of the checked retrains ended above RETRAIN_RESIDUAL, values that are not where retraining
    ends; one unfinished retrain alone does not decide, a non-finite residual is unfinished."""
    done = [1e-9, 1e-6, RETRAIN_RESIDUAL, 1e-4]
    assert not is_nonlinear(0.98, done)
    assert is_nonlinear(TRACK_BELOW - 1e-3, done)
    assert not is_nonlinear(0.98, [*done[:3], 2 * RETRAIN_RESIDUAL])  # one of four
    assert is_nonlinear(0.98, [*done[:2], 0.5, 0.5])  # half
    assert not is_nonlinear(0.98, [1e-9] * 5 + [0.5] * 3)  # three of eight
    assert is_nonlinear(0.98, [done[0], 0.5, 0.5, float("nan")])  # three of four
    assert not is_nonlinear(0.5, done, track_below=0.4)


def test_note_says_which_reason_made_the_check_call_removals_nonlinear():
    """The diagnostics' note names the reason: the expected Spearman below 0.9, or (expected
    above it) how many of the check's retrains did not finish; a linear verdict adds no note."""
    from metafluence.influence.removal import _with_check

    def check(expected: float, residual: list[float]) -> dict:
        return {
            "items": list(range(len(residual))),
            "expected_spearman": expected,
            "spearman_band": [expected - 0.05, expected + 0.05],
            "residual": residual,
            "retrains_unfinished": sum(r > RETRAIN_RESIDUAL for r in residual),
            "nonlinear": is_nonlinear(expected, residual),
        }

    def notes(chk: dict) -> list[str]:
        diag = {"regime": "well_conditioned", "notes": []}
        out = _with_check(diag, chk, "task", 0.0)
        assert out["regime"] == ("nonlinear" if chk["nonlinear"] else "linear")
        return [n for n in out["notes"] if n.startswith("Newton check")]

    (low,) = notes(check(0.7, [1e-8] * 4))
    assert "at 0.70 (< 0.9;" in low
    (unfinished,) = notes(check(0.97, [1e-8, 0.2, 0.3, 0.5]))
    assert "at 0.97 (but 3 of its 4 retrains ended" in unfinished and "up to 0.5" in unfinished
    assert notes(check(0.97, [1e-8, 1e-8, 1e-8, 0.5])) == []
