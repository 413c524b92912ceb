"""The curvature object (fit once, reuse): against the exact dense inverse, in every consumer.

Float64 throughout; the dense ``H`` is built independently with ``solvers.dense_matrix`` from the
point's own total-HVP operator and inverted with ``torch.linalg.solve``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.bilevel.curvature import Curvature, as_curvature
from metafluence.solvers import dense_matrix
from tests._close import assert_close_normwise, rel_err
from tests.toy_tasks import random_tasks

DP = 0.05  # δ'


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=2, lr=0.3), damping=1e-2)
    lam = prob.init_params()
    train, target = random_tasks(7, 0, classes=3), random_tasks(3, 5, classes=3)
    return prob, lam, train, target


def dense_H(prob, lam, train, kind):
    pt = prob.point(lam, train)
    H = dense_matrix(pt.matvec(kind), pt.lam.numel(), dtype=torch.float64)
    return pt, 0.5 * (H + H.T)


@pytest.mark.parametrize("kind", ["exact", "gauss_newton"])
def test_dense_fit_is_the_exact_inverse(setup, kind):
    prob, lam, train, _ = setup
    pt, H = dense_H(prob, lam, train, kind)
    P = H.shape[0]
    curv = mf.fit_curvature(prob, lam, train, kind=kind, method="dense", solve_damping=DP)
    assert curv.fitted and curv.fits(pt) and curv.fit_info["hvp_rows"] == P
    B = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torch.linalg.solve(H + DP * torch.eye(P, dtype=H.dtype), B.T).T
    res = curv.solve(pt, B)
    assert rel_err(res.x, want) < 1e-10 and res.converged and res.iters == 0
    one = curv.solve(pt, B[0])  # [P] in, [P] out
    assert one.x.shape == (P,) and rel_err(one.x, want[0]) < 1e-10
    ev = torch.linalg.eigvalsh(H) + DP
    lo, hi = curv.extreme_eigenvalues()
    assert abs(lo - float(ev[0])) < 1e-9 * float(ev.abs().max())
    assert abs(hi - float(ev[-1])) < 1e-9 * float(ev.abs().max())


def test_lowrank_full_rank_is_exact_and_low_rank_preconditions(setup):
    prob, lam, train, _ = setup
    pt, H = dense_H(prob, lam, train, "gauss_newton")
    P = H.shape[0]
    b = torch.randn(2, P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    want = torch.linalg.solve(H + DP * torch.eye(P, dtype=H.dtype), b.T).T
    full = mf.fit_curvature(
        prob,
        lam,
        train,
        kind="gauss_newton",
        method="lowrank",
        solver="approx",
        rank=P,
        power_iters=2,
        solve_damping=DP,
    )
    assert rel_err(full.solve(pt, b).x, want) < 1e-8
    opts = {"rtol": 1e-10, "maxiter": 500}
    plain = mf.fit_curvature(
        prob, lam, train, kind="gauss_newton", method="krylov", solve_damping=DP, options=opts
    )
    pre = mf.fit_curvature(
        prob,
        lam,
        train,
        kind="gauss_newton",
        method="lowrank",
        rank=P // 3,
        solve_damping=DP,
        options=opts,
    )
    r_plain, r_pre = plain.solve(pt, b), pre.solve(pt, b)
    assert r_plain.converged and r_pre.converged
    assert rel_err(r_pre.x, want) < 1e-7 and rel_err(r_plain.x, want) < 1e-7
    assert r_pre.iters < r_plain.iters, (r_pre.iters, r_plain.iters)


def test_every_consumer_reuses_the_fit(setup, monkeypatch):
    """removal_effects, param_influence and edit with a fitted curvature equal the direct
    solve, and none of them forms H again (the dense fit is reused)."""
    prob, lam, train, target = setup
    curv = mf.fit_curvature(prob, lam, train, kind="exact", method="dense", solve_damping=DP)
    kw = dict(curvature="exact", solver="direct", solve_damping=DP)
    ref = mf.removal_effects(prob, lam, train, target=target, **kw)
    calls = []
    real = mf.solvers.SOLVERS["direct"]
    monkeypatch.setitem(
        mf.solvers.SOLVERS, "direct", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    got = mf.removal_effects(prob, lam, train, target=target, curvature=curv)
    assert_close_normwise(got.scores, ref.scores, 1e-10)
    assert_close_normwise(
        got.all_scores["support_point"][2], ref.all_scores["support_point"][2], 1e-9
    )
    assert got.diagnostics["condition_exact"] and got.diagnostics["solve"]["method"] == "dense"
    remove = {"task": [1, 4]}
    monkeypatch.setitem(mf.solvers.SOLVERS, "direct", real)
    d_ref = mf.param_influence(prob, lam, train, remove, **kw)
    monkeypatch.setitem(
        mf.solvers.SOLVERS, "direct", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    d_got = mf.param_influence(prob, lam, train, remove, curvature=curv)
    assert_close_normwise(d_got, d_ref, 1e-10)
    e_got = mf.edit(prob, lam, train, remove, curvature=curv)
    assert not calls  # no solve formed H: every one used the fit
    e_ref = mf.edit(prob, lam, train, remove, **kw)
    assert_close_normwise(e_got, e_ref, 1e-10)
    # Newton corrections solve at other points: the fit does not apply there (a dense solve)
    n_got = mf.edit(prob, lam, train, remove, newton_steps=1, curvature=curv)
    n_ref = mf.edit(prob, lam, train, remove, newton_steps=1, **kw)
    assert_close_normwise(n_got, n_ref, 1e-9)


def test_save_load_and_binding(setup, tmp_path):
    prob, lam, train, _ = setup
    curv = mf.fit_curvature(
        prob,
        lam,
        train,
        kind="gauss_newton",
        method="lowrank",
        rank=8,
        solve_damping=DP,
        options={"rtol": 1e-9},
    )
    path = curv.save(tmp_path / "curv.safetensors")
    back = mf.Curvature.load(path)
    assert back.config() == curv.config() and back.tail == curv.tail
    pt = prob.point(lam, train)
    b = torch.ones(lam_numel(prob, lam), dtype=torch.float64)
    assert torch.equal(back.solve(pt, b).x, curv.solve(pt, b).x)
    # bound to its point: another λ (or other tasks) is not the fitted point
    other = prob.point(prob.flat(lam) + 1e-3, train)
    assert back.fits(pt) and not back.fits(other)
    assert not back.fits(prob.point(lam, train[:-1]))
    from metafluence._store import save_tensors

    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, {"stage": "solve"})
    with pytest.raises(ValueError, match="not a stored Curvature"):
        mf.Curvature.load(tmp_path / "x.safetensors")


def lam_numel(prob, lam):
    return prob.flat(lam).numel()


def test_multi_target_is_one_solve_with_one_column_per_target(setup):
    prob, lam, train, target = setup
    t2 = random_tasks(2, 9, classes=3)
    kw = dict(curvature="gauss_newton", solve_damping=DP, diagnostics=False)
    many = mf.removal_effects(prob, lam, train, targets=[target, t2], **kw)
    assert many.scores.shape == (7, 2) and many.solve.x.shape[0] == 2
    for j, t in enumerate([target, t2]):
        one = mf.removal_effects(prob, lam, train, target=t, **kw)
        assert_close_normwise(many.scores[:, j], one.scores, 1e-10)
        assert_close_normwise(
            many.all_scores["query_point"][3][:, j], one.all_scores["query_point"][3], 1e-10
        )
    with pytest.raises(ValueError, match="not both"):
        mf.removal_effects(prob, lam, train, target=target, targets=[t2])
    with pytest.raises(ValueError, match="non-empty"):
        mf.removal_effects(prob, lam, train, targets=[])


def test_default_solve_is_exact_on_small_problems():
    """The default (``solver="auto"``: a dense fit for ``P ≤ 1024``) solves an ill-conditioned
    small unrolled MAML (P = 294, condition ≈ 3.6e4) exactly and reports the exact condition
    number, where CG needs as many iterations as the rank of H (here more than 20)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 2)
    ).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=3, lr=0.4), damping=1e-5)
    lam, train = prob.init_params(), random_tasks(6, 0)
    u = torch.randn(prob.flat(lam).numel(), dtype=torch.float64)

    def target(p):  # a right-hand side that excites every eigendirection
        return (prob.spec.flatten(p) * u).sum()

    res = mf.removal_effects(prob, lam, train, target=target, curvature="gauss_newton")
    pt, H = dense_H(prob, lam, train, "gauss_newton")
    assert res.solve.converged and rel_err(res.solve.x, torch.linalg.solve(H, u)) < 1e-7
    assert res.diagnostics["condition_exact"] and res.diagnostics["solve"]["method"] == "dense"
    ev = torch.linalg.eigvalsh(H)
    assert res.diagnostics["condition"] == pytest.approx(float(ev[-1] / ev[0]), rel=1e-6)
    assert res.diagnostics["condition"] > 1e4
    with pytest.warns(RuntimeWarning, match="total solve for the target .* did not converge"):
        cg = mf.removal_effects(
            prob,
            lam,
            train,
            target=target,
            curvature="gauss_newton",
            solver="cg",
            solver_kwargs={"maxiter": 20},
            diagnostics=False,
        )
    assert not cg.solve.converged


def test_one_validation_names_the_argument(setup):
    prob, lam, train, target = setup
    curv = Curvature("exact", "krylov", "cg", 0.1)
    with pytest.raises(ValueError, match="solve_damping given together with a Curvature"):
        mf.removal_effects(prob, lam, train, target=target, curvature=curv, solve_damping=0.2)
    with pytest.raises(ValueError, match="method='nope'"):
        Curvature("exact", "nope")
    with pytest.raises(ValueError, match="it needs method in \\('lowrank', 'secant'\\)"):
        Curvature("exact", "krylov", "approx")
    with pytest.raises(TypeError, match="solve_damping"):
        Curvature("exact", solve_damping="0.1")
    with pytest.raises(ValueError, match="solve_damping"):
        as_curvature("exact", "cg", -1.0)
    with pytest.raises(TypeError, match="curvature must be"):
        as_curvature(3)
    with pytest.raises(ValueError, match="curvature="):
        as_curvature("hessian")
    bad = dataclasses.replace(curv)
    assert bad.unfitted() == curv


def test_a_non_stationary_lambda_is_named_in_units_of_the_scores(setup):
    """At the initial parameters (‖∇F‖ far from 0) one Newton step toward stationarity moves
    the target more than a typical task's removal; at the closed-form minimiser it does not."""
    prob, lam, train, target = setup
    with pytest.warns(UserWarning, match=r"λ\* is not stationary \(‖∇F‖ = "):
        res = mf.removal_effects(prob, lam, train, target=target, curvature="gauss_newton")
    g = prob.point(lam, train).meta_grad()
    assert res.diagnostics["stationarity_shift"] == pytest.approx(abs(float(res.solve.x @ g)))
    assert res.diagnostics["stationarity_shift"] > float(res.scores.abs().median())
    from tests.influence.closed_form import ClosedForm, make_tasks, problem

    tasks, tgt = make_tasks(12, d=3, seed=1), make_tasks(4, d=3, seed=2)
    lam_star = ClosedForm(tasks, 1.0, 0.01).minimiser()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = mf.removal_effects(problem(3, 1.0, 0.01), lam_star, tasks, target=tgt)
    assert ok.diagnostics["stationarity_shift"] < 1e-6 * float(ok.scores.abs().max())
    assert not [w for w in caught if "not stationary" in str(w.message)]
