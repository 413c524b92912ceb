"""The training-horizon response ``φ_t(A) b = A⁻¹(I − e^{−tA}) b``: against ``matrix_exp`` and
against actual gradient-descent retraining from a λ that is *not* stationary (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.solvers import dense_matrix
from tests._close import rel_err
from tests.toy_tasks import random_tasks


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=1e-2)
    train = random_tasks(6, 0, classes=3)
    lam = prob.init_params()  # not stationary: ‖∇F‖ of order 1
    pt = prob.point(lam, train)
    H = dense_matrix(pt.matvec("exact"), pt.lam.numel(), dtype=torch.float64)
    return prob, lam, train, pt, 0.5 * (H + H.T)


@pytest.mark.parametrize("t", [0.3, 5.0])
def test_dense_horizon_is_the_matrix_function(setup, t):
    prob, lam, train, pt, H = setup
    P, dp = H.shape[0], 0.02
    curv = mf.fit_curvature(
        prob, lam, train, kind="exact", method="dense", solve_damping=dp, horizon=t
    )
    B = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A = H + dp * torch.eye(P, dtype=H.dtype)
    want = torch.linalg.solve(
        A, (torch.eye(P, dtype=H.dtype) - torch.linalg.matrix_exp(-t * A)) @ B.T
    ).T
    res = curv.solve(pt, B)
    assert rel_err(res.x, want) < 1e-9 and res.info["method"].startswith("horizon")
    if torch.linalg.eigvalsh(A).min() > 0:  # long horizons on a PD A: the ordinary solve
        far = mf.fit_curvature(
            prob, lam, train, kind="exact", method="dense", solve_damping=dp, horizon=1e6
        )
        assert rel_err(far.solve(pt, B).x, torch.linalg.solve(A, B.T).T) < 1e-8


def test_horizon_edit_predicts_gradient_descent_without_the_task(setup):
    """From a non-stationary λ, ``T`` steps of gradient descent (step ``η``) without task ``i``
    minus ``T`` steps with it is ``φ_{ηT}(H) c_i g_i`` to first order; the edit with a horizon
    curvature predicts it (the ordinary edit, ``H⁻¹ c_i g_i``, does not: H is indefinite here)."""
    prob, lam, train, pt, H = setup
    eta, T, i = 2e-3, 250, 2
    full = prob.batch(train, pt.lam)
    without = full.reweighted({"task": [i]}, 0.0)

    def descend(batch):
        x = pt.lam.clone()
        for _ in range(T):
            x = x - eta * prob.point(x, batch).meta_grad()
        return x

    actual = descend(without) - descend(full)
    curv = mf.fit_curvature(prob, lam, train, kind="exact", method="dense", horizon=eta * T)
    edited = prob.flat(mf.edit(prob, lam, train, remove={"task": [i]}, curvature=curv))
    predicted = edited - pt.lam
    assert rel_err(predicted, actual) < 0.05, rel_err(predicted, actual)
    plain = mf.fit_curvature(prob, lam, train, kind="exact", method="dense")
    ordinary = prob.flat(mf.edit(prob, lam, train, remove={"task": [i]}, curvature=plain))
    assert rel_err(ordinary - pt.lam, actual) > 0.5  # the stationary formula misses it


def test_horizon_arguments_are_checked(setup):
    prob, lam, train, pt, _ = setup
    with pytest.raises(ValueError, match="horizon needs a fitted eigendecomposition"):
        mf.fit_curvature(prob, lam, train, kind="exact", method="krylov", horizon=1.0)
    with pytest.raises(ValueError, match="horizon"):
        mf.fit_curvature(prob, lam, train, kind="exact", method="dense", horizon=-1.0)
    curv = mf.fit_curvature(prob, lam, train, kind="exact", method="dense", horizon=1.0)
    other = prob.point(pt.lam + 0.1, train)
    with pytest.raises(ValueError, match="answers at the point it was fitted at"):
        curv.solve(other, pt.lam)


def test_horizon_is_stored_and_fingerprinted(setup, tmp_path):
    prob, lam, train, pt, _ = setup
    curv = mf.fit_curvature(prob, lam, train, kind="exact", method="dense", horizon=0.7)
    back = mf.Curvature.load(curv.save(tmp_path / "c.safetensors"))
    assert back.horizon == 0.7 and back.config() == curv.config()
    plain = mf.fit_curvature(prob, lam, train, kind="exact", method="dense")
    assert plain.config() != curv.config()  # a stored solve of one is never reused for the other
