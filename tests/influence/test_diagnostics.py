"""Diagnostics you can trust (issue 16, item 6): the conditioning label against the dense
spectrum, and the Newton check's own solves kept from the user."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.bilevel.curvature import Curvature
from metafluence.influence import diagnose

KRYLOV = Curvature("exact", "krylov", "cg")  # unfitted: diagnose runs Lanczos


def known_condition_tasks(d: int, kappa: float, M: int = 3, seed: int = 0) -> list[mf.Task]:
    """Tasks whose total Hessian is exactly ``H = 2 Q diag(s) Qᵀ``, ``s`` log-spaced in
    ``[1/κ, 1]``: a linear model with squared loss, the proximal inner map with empty-signal
    supports (``x = 0``, so ``θ = λ``) and query inputs with ``Xqᵀ Xq / m = Q diag(s) Qᵀ``."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))
    s = torch.logspace(0, -math.log10(kappa), d, dtype=dt)
    tasks = []
    for i in range(M):
        Z, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dt))  # orthonormal columns
        xq = math.sqrt(d) * (Z * s.sqrt()) @ Q.T
        yq = torch.randn(d, generator=g, dtype=dt)
        xs = torch.zeros(2, d, dtype=dt)
        tasks.append(mf.Task(support=(xs, torch.zeros(2, dtype=dt)), query=(xq, yq), id=i))
    return tasks


def linear_problem(d: int) -> mf.MetaProblem:
    model = nn.Linear(d, 1, bias=False).double()
    return mf.MetaProblem(
        model, loss="mse", inner=mf.inner.Implicit(reg=1.0, solver="direct"), damping=0.0
    )


@pytest.fixture(scope="module", params=[1e2, 2.3e3, 1e4], ids=["k1e2", "k2.3e3", "k1e4"])
def known(request):
    d, kappa = 100, request.param
    prob, tasks = linear_problem(d), known_condition_tasks(d, kappa)
    lam = torch.zeros(d, dtype=torch.float64)
    dense = mf.fit_curvature(prob, lam, tasks, kind="exact", method="dense")
    return kappa, prob, prob.point(lam, tasks), dense


def test_known_condition_is_the_dense_one(known):
    kappa, _, _, dense = known
    lo, hi = dense.extreme_eigenvalues()
    assert hi / lo == pytest.approx(kappa, rel=1e-8)


def test_label_from_dense_fit_is_exact(known):
    kappa, _, pt, dense = known
    dg = diagnose(pt, dense)
    assert dg["condition_exact"] and dg["lanczos_steps"] == 0
    assert dg["condition"] == pytest.approx(kappa, rel=1e-8) == dg["condition_upper"]
    assert dg["regime"] == ("well_conditioned" if kappa < 1e3 else "ill_conditioned")


def test_lanczos_label_never_calls_an_ill_conditioned_h_well_conditioned(known):
    """Issue 16: 20 Lanczos steps put λ_max/λ_min of a κ = 2.3e3 Hessian under 1e3 and the
    label said ``well_conditioned``. The label now needs a certified bound; with the default
    extension (up to 4 × 20 steps) it is right for κ = 1e2, 2.3e3 and 1e4."""
    kappa, _, pt, _ = known
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        only20 = diagnose(pt, KRYLOV, steps=20, max_steps=20)
        dg = diagnose(pt, KRYLOV, steps=20)
    # the bounds enclose the dense condition number
    for d in (only20, dg):
        assert d["condition"] <= kappa * (1 + 1e-9) <= d["condition_upper"] * (1 + 2e-9)
        assert not d["condition_exact"]
    if kappa == 2.3e3:
        assert only20["condition"] < 1e3  # the Ritz ratio alone would have said "well"
    if kappa > 1e3:
        assert only20["regime"] in ("ill_conditioned", "uncertain")
    want = "well_conditioned" if kappa < 1e3 else "ill_conditioned"
    assert dg["regime"] == want, (kappa, dg)
    assert dg["lanczos_steps"] <= 80


def test_uncertain_label_names_the_bounds():
    """κ = 1e2 at P = 100: 20 steps cannot certify κ ≤ 1e3 (about 80 can)."""
    d = 100
    pt = linear_problem(d).point(torch.zeros(d, dtype=torch.float64), known_condition_tasks(d, 1e2))
    dg = diagnose(pt, KRYLOV, steps=20, max_steps=20)
    assert dg["regime"] == "uncertain"
    (note,) = [n for n in dg["notes"] if n.startswith("conditioning uncertain")]
    assert "between" in note and "20 Lanczos steps" in note


def test_removal_effects_reports_the_bounds():
    d = 60
    prob, tasks = linear_problem(d), known_condition_tasks(d, 2.3e3)
    target = known_condition_tasks(d, 2.3e3, M=1, seed=1)
    lam = torch.zeros(d, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(prob, lam, tasks, target=target, solver="cg", lanczos_steps=10)
    dg = res.diagnostics
    assert dg["regime"] == "ill_conditioned"
    assert dg["condition"] <= 2.3e3 * (1 + 1e-9) <= dg["condition_upper"]
    assert dg["lambda_min_lower"] <= dg["lambda_min"]
    with pytest.raises(ValueError, match="max_steps"):
        diagnose(prob.point(lam, tasks), KRYLOV, max_steps=0)
