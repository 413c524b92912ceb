"""Query-point scores by fused per-sample gradient dots equal the mixed-HVP scores (float64)."""

from __future__ import annotations

import warnings

import pytest
import torch

import metafluence as mf
from metafluence.influence.query import query_point_scores

from ..bilevel.test_derivatives import conv, mlp, tasks_for

INNERS = {
    "unrolled": lambda h: mf.inner.Unrolled(steps=2, lr=0.5),
    "unrolled-fo": lambda h: mf.inner.Unrolled(steps=2, lr=0.5, first_order=True),
    "implicit": lambda h: mf.inner.Implicit(reg=4.0, solver="direct"),
    "headonly-unrolled": lambda h: mf.inner.HeadOnly(head=h, steps=3, lr=0.5),
    "headonly-implicit": lambda h: mf.inner.HeadOnly(head=h, reg=1.0, solver="direct"),
}
MODELS = {"mlp": (mlp, (4,), "2"), "conv": (conv, (1, 6, 6), "head")}
CASES = [("mlp", i) for i in INNERS] + [("conv", "unrolled"), ("conv", "headonly-implicit")]


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["psg", "jvp"])
@pytest.mark.parametrize("model_name,inner_name", CASES)
def test_query_point_scores_equal_mixed_product(model_name, inner_name, method):
    make, shape, head = MODELS[model_name]
    prob = mf.MetaProblem(make(), inner=INNERS[inner_name](head), damping=0.01, chunk_size=3)
    lam = prob.flat(prob.init_params())
    tasks, target = tasks_for(shape, M=5), tasks_for(shape, M=2, seed=1)
    # non-uniform weights: the scores carry c_k, v_kq
    g = torch.Generator().manual_seed(4)
    for t in tasks:
        t.query_weight = torch.rand(t.query[0].shape[0], generator=g, dtype=torch.float64) + 0.5
    with warnings.catch_warnings():  # any s will do: 3 CG iterations, unconverged
        warnings.simplefilter("ignore", RuntimeWarning)
        res = mf.removal_effects(
            prob,
            lam,
            tasks,
            target=target,
            items="query_point",
            solver="cg",
            solver_kwargs={"maxiter": 3},
            diagnostics=False,
        )
    want = torch.stack(res.all_scores["query_point"])
    pt = prob.point(lam, tasks)
    got = torch.cat([query_point_scores(prob, e, res.solve.x, method) for e in pt.engines])
    assert got.shape == want.shape == (5, 6)
    assert rel(got, want) <= 1e-8, rel(got, want)
    # the task score is the sum of its query-point scores (g_k = Σ_q (v_q/m) D_λ ℓ_q)
    assert rel(got.sum(1), res.all_scores["task"]) <= 1e-8


def test_query_point_scores_check_arguments():
    prob = mf.MetaProblem(mlp(), inner=mf.inner.Unrolled(steps=1), damping=0.01)
    lam = prob.flat(prob.init_params())
    (eng,) = prob.point(lam, tasks_for((4,), M=2)).engines
    with pytest.raises(ValueError, match="method="):
        query_point_scores(prob, eng, lam, method="dense")
    with pytest.raises(ValueError, match="s has shape"):
        query_point_scores(prob, eng, lam[:-1])
