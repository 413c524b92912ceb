"""The secant curvature: Ritz pairs of the stationarity phase's secant pairs, against dense H.

Float64; the dense ``H`` comes from the point's own exact total-HVP operator
(``solvers.dense_matrix``) and is inverted with ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.bilevel.curvature import secant_eigenpairs
from metafluence.solvers import dense_matrix
from tests._close import rel_err
from tests.toy_tasks import random_tasks

DP = 0.05  # δ'


@pytest.fixture(scope="module")
def stationary():
    """A small MAML problem trained to ‖∇F‖ ≤ 1e-9 by the stationarity phase (which keeps its
    secant pairs), with the dense exact total Hessian at that λ*."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=5e-2)
    train = random_tasks(6, 0, classes=3)
    lam, report = mf.train.make_stationary(prob, prob.init_params(), train, tol=1e-9)
    assert report.converged and report.pairs is not None
    pt = prob.point(lam, train)
    H = dense_matrix(pt.matvec("exact"), pt.lam.numel(), dtype=torch.float64)
    return prob, lam, train, report, pt, 0.5 * (H + H.T)


def _rhs(P: int, k: int = 3) -> torch.Tensor:
    return torch.randn(k, P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_exact_pairs_spanning_everything_give_the_exact_inverse(stationary):
    prob, lam, train, _, pt, H = stationary
    P = H.shape[0]
    S = torch.randn(P + 4, P, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ev, U = secant_eigenpairs(S, S @ H)  # y_j = H s_j exactly, span(S) = everything
    assert ev.numel() == P
    want = torch.linalg.eigvalsh(H)
    assert rel_err(torch.sort(ev).values, want) < 1e-10
    curv = mf.fit_curvature(
        prob, lam, train, kind="exact", method="secant", solver="approx",
        solve_damping=DP, pairs=(S, S @ H), tail_probes=0,
    )  # fmt: skip
    B = _rhs(P)
    x = curv.solve(pt, B).x
    assert rel_err(x, torch.linalg.solve(H + DP * torch.eye(P, dtype=H.dtype), B.T).T) < 1e-9


def test_partial_span_is_exact_on_the_span(stationary):
    """With ``Y = S H`` for ``r < P`` pairs, the Ritz values are those of ``H`` compressed to
    ``span(S)`` (Cauchy interlacing: inside the spectrum), and ``U`` spans ``span(S)``."""
    _, _, _, _, _, H = stationary
    P = H.shape[0]
    S = torch.randn(7, P, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ev, U = secant_eigenpairs(S, S @ H)
    Q = torch.linalg.qr(S.T).Q
    assert rel_err(torch.sort(ev).values, torch.linalg.eigvalsh(Q.T @ H @ Q)) < 1e-10
    assert rel_err(U @ (U.T @ S.T), S.T) < 1e-10
    full = torch.linalg.eigvalsh(H)
    assert float(ev.min()) >= float(full.min()) - 1e-10
    assert float(ev.max()) <= float(full.max()) + 1e-10


def test_training_pairs_precondition_cg_to_the_dense_answer(stationary):
    """The phase's own pairs (free curvature): CG preconditioned by them reaches the dense
    solution, in fewer iterations than plain CG; the tail costs ``tail_probes`` rows only."""
    prob, lam, train, report, pt, H = stationary
    P = H.shape[0]
    assert torch.linalg.eigvalsh(H).min() > 0  # a minimum: CG applies
    B = _rhs(P)
    want = torch.linalg.solve(H + DP * torch.eye(P, dtype=H.dtype), B.T).T
    opts = {"rtol": 1e-10, "maxiter": 500}
    sec = mf.fit_curvature(
        prob, lam, train, kind="exact", method="secant", solver="cg",
        solve_damping=DP, pairs=report.pairs, options=opts,
    )  # fmt: skip
    assert sec.fit_info["hvp_rows"] == 4 and sec.fit_info["pairs"] == report.pairs[0].shape[0]
    plain = mf.fit_curvature(
        prob, lam, train, kind="exact", method="krylov", solver="cg", solve_damping=DP,
        options=opts,
    )  # fmt: skip
    a, b = sec.solve(pt, B), plain.solve(pt, B)
    assert a.converged and rel_err(a.x, want) < 1e-8
    assert a.iters < b.iters, (a.iters, b.iters)
    approx = mf.Curvature(**{**sec.__dict__, "solver": "approx"})
    assert rel_err(approx.solve(pt, B).x, want) < 0.5  # the free answer: rough, not wrong


def test_secant_arguments_are_checked(stationary):
    prob, lam, train, report, _, _ = stationary
    with pytest.raises(ValueError, match="pairs=\\(S, Y\\) go with method='secant'"):
        mf.fit_curvature(prob, lam, train, kind="exact", method="secant")
    with pytest.raises(ValueError, match="use kind='exact'"):
        mf.fit_curvature(prob, lam, train, kind="gauss_newton", method="secant", pairs=report.pairs)
    S, Y = report.pairs
    with pytest.raises(ValueError, match="expected \\[r, P="):
        mf.fit_curvature(
            prob, lam, train, kind="exact", method="secant", pairs=(S[:, :3], Y[:, :3])
        )
    with pytest.raises(ValueError, match="pairs are empty"):
        secant_eigenpairs(S[:0], Y[:0])
    assert report.as_dict()["secant_pairs"] == S.shape[0] and "pairs" not in report.as_dict()


def test_diagnostics_read_the_fit_ritz_values(stationary):
    """``diagnose`` with a fitted secant curvature spends no Lanczos pass: its bounds are the
    fit's Ritz values, inside the dense spectrum of ``H + δ'I`` (up to 1%: the training pairs
    measure ``H`` along the path to λ*, not at λ* exactly)."""
    prob, lam, train, report, pt, H = stationary
    curv = mf.fit_curvature(
        prob, lam, train, kind="exact", method="secant", solver="approx",
        solve_damping=DP, pairs=report.pairs, tail_probes=0,
    )  # fmt: skip
    d = mf.influence.removal.diagnose(pt, curv)
    assert d["lanczos_steps"] == 0 and d["spectrum_from"] == "fit Ritz values"
    ev = torch.linalg.eigvalsh(H) + DP
    lo, hi = float(ev.min()), float(ev.max())
    assert 0.99 * lo <= d["lambda_min"] <= d["lambda_max"] <= 1.01 * hi


def test_a_fitted_curvature_shares_one_point_between_solves(stationary, monkeypatch):
    """The scores and the edit at λ* stand on one point: the gradient graph (the
    linearisation) is built once for both; another λ gets a new point; ``release`` drops it;
    an unfitted (string) curvature keeps nothing. Values equal fresh points' to rounding."""
    import metafluence.bilevel.unrolled as unrolled

    prob, lam, train, report, _, _ = stationary
    target = random_tasks(3, 7, classes=3)
    curv = mf.fit_curvature(
        prob, lam, train, kind="exact", method="secant", solver="cg", solve_damping=DP,
        pairs=report.pairs, options={"maxiter": 50, "rtol": 1e-12},
    )  # fmt: skip
    fresh = mf.removal_effects(prob, lam, train, target=target, curvature=curv, diagnostics=False)
    fresh_edit = prob.flat(mf.edit(prob, lam, train, remove={"task": [1, 4]}, curvature=curv))
    curv.release()
    builds = []
    real = unrolled.vjp
    monkeypatch.setattr(unrolled, "vjp", lambda *a, **k: builds.append(1) or real(*a, **k))
    res = mf.removal_effects(prob, lam, train, target=target, curvature=curv, diagnostics=False)
    copy = {k: v.clone() for k, v in prob.unflat(prob.flat(lam)).items()}  # equal, not the same
    edited = prob.flat(mf.edit(prob, copy, train, remove={"task": [1, 4]}, curvature=curv))
    assert len(builds) == 1  # one linearisation served the scores' solve, scores and the edit
    assert torch.equal(res.scores, fresh.scores) and torch.equal(edited, fresh_edit)
    assert curv.point(prob, lam, train) is curv.point(prob, copy, train)
    assert curv.point(prob, prob.flat(lam) + 1e-3, train) is not curv.point(prob, lam, train)
    kept = curv.point(prob, lam, train)
    curv.release()
    assert curv.point(prob, lam, train) is not kept
    plain = mf.bilevel.curvature.Curvature("exact", "krylov", "cg", DP)
    assert plain.point(prob, lam, train) is not plain.point(prob, lam, train)
