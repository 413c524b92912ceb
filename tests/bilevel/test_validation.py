"""Bad input gives a ValueError/TypeError naming the task id and the field."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf


def mk(i, n=4, m=5, d=3, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed + i)
    return mf.Task(
        support=(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)),
        query=(torch.randn(m, d, generator=g), torch.randint(0, classes, (m,), generator=g)),
        id=f"t{i}",
    )


@pytest.fixture
def prob():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.1))


def test_mismatched_shapes_across_tasks(prob):
    tasks = [mk(0), mk(1, n=6)]
    with pytest.raises(ValueError, match=r"task 't1': support x has shape \(6, 3\)"):
        prob.outer_loss(prob.init_params(), tasks)


def test_empty_sets(prob):
    t = mk(0)
    empty = mf.Task(support=(t.support[0][:0], t.support[1][:0]), query=t.query, id="e")
    with pytest.raises(ValueError, match="task 'e': support x is empty"):
        prob.outer_loss(prob.init_params(), [empty])
    empty_q = mf.Task(support=t.support, query=(t.query[0][:0], t.query[1][:0]), id="q")
    with pytest.raises(ValueError, match="task 'q': query x is empty"):
        prob.outer_loss(prob.init_params(), [empty_q])
    with pytest.raises(ValueError, match="tasks is empty"):
        prob.outer_loss(prob.init_params(), [])


def test_support_x_y_length_mismatch(prob):
    t = mk(0)
    bad = mf.Task(support=(t.support[0], t.support[1][:2]), query=t.query, id="b")
    with pytest.raises(ValueError, match="task 'b': support"):
        prob.outer_loss(prob.init_params(), [bad])


@pytest.mark.parametrize("field", ["support", "query"])
def test_labels_out_of_range(prob, field):
    t = mk(0)
    x, y = getattr(t, field)
    y = y.clone()
    y[1] = 3
    kw = {"support": t.support, "query": t.query, field: (x, y)}
    bad = mf.Task(id="lab", **kw)
    with pytest.raises(ValueError, match=rf"task 'lab': {field} y has label 3 outside \[0, 3\)"):
        prob.outer_loss(prob.init_params(), [mk(1), bad])
    y[1] = -1
    with pytest.raises(ValueError, match=rf"task 'lab': {field} y has label -1"):
        prob.outer_loss(prob.init_params(), [mk(1), bad])


def test_float_labels_rejected(prob):
    t = mk(0)
    bad = mf.Task(support=(t.support[0], t.support[1].float()), query=t.query, id="f")
    with pytest.raises(TypeError, match="support y has dtype"):
        prob.outer_loss(prob.init_params(), [bad])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("field", ["support", "query"])
def test_non_finite_data(prob, value, field):
    t = mk(0)
    x, y = getattr(t, field)
    x = x.clone()
    x[0, 0] = value
    kw = {"support": t.support, "query": t.query, field: (x, y)}
    with pytest.raises(ValueError, match=rf"task 'nf': {field} x contains NaN or Inf"):
        prob.outer_loss(prob.init_params(), [mk(1), mf.Task(id="nf", **kw)])


def test_non_finite_meta_params(prob):
    lam = prob.init_params()
    lam["0.weight"] = lam["0.weight"].clone()
    lam["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"meta_params\['0.weight'\] contains NaN"):
        prob.outer_loss(lam, [mk(0)])


def test_wrong_meta_params(prob):
    lam = prob.init_params()
    del lam["2.bias"]
    with pytest.raises(KeyError, match="2.bias"):
        prob.outer_loss(lam, [mk(0)])
    lam = prob.init_params()
    lam["2.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"meta_params\['2.bias'\] has shape \(5,\)"):
        prob.outer_loss(lam, [mk(0)])


def test_duplicate_ids(prob):
    with pytest.raises(ValueError, match="duplicate task id 't0'"):
        prob.outer_loss(prob.init_params(), [mk(0), mk(0)])


def test_bad_arguments(prob):
    tasks, target = [mk(0), mk(1)], [mk(2)]
    lam = prob.init_params()
    with pytest.raises(ValueError, match="items="):
        mf.removal_effects(prob, lam, tasks, target=target, items="point")
    with pytest.raises(ValueError, match="curvature="):
        mf.removal_effects(prob, lam, tasks, target=target, curvature="fisher")
    with pytest.raises(ValueError, match="solver"):
        mf.removal_effects(prob, lam, tasks, target=target, solver="magic")
    with pytest.raises(ValueError, match="target is required"):
        mf.removal_effects(prob, lam, tasks)
    with pytest.raises(ValueError, match="solve_damping"):
        mf.removal_effects(prob, lam, tasks, target=target, solve_damping=-1.0)
    with pytest.raises(ValueError, match="reg"):
        mf.inner.Implicit(reg=0.0)
    with pytest.raises(ValueError, match="solver"):
        mf.inner.Implicit(solver="lu")
    with pytest.raises(ValueError, match="head/adapt"):
        mf.MetaProblem(prob.model, inner=mf.inner.HeadOnly(head="classifier"))
    with pytest.raises(ValueError, match="remove"):
        mf.param_influence(prob, lam, tasks, remove={"task": [7]})


def test_unconverged_solve_is_reported_and_warned(prob):
    tasks, target = [mk(i) for i in range(4)], [mk(9)]
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = mf.removal_effects(
            prob,
            prob.init_params(),
            tasks,
            target=target,
            solve_damping=0.1,
            solver_kwargs={"maxiter": 1, "rtol": 1e-12},
            diagnostics=False,
        )
    assert res.solve.converged is False
    assert res.diagnostics["solve_converged"] is False


def test_diagnostics_regimes(prob):
    tasks, target = [mk(i) for i in range(4)], [mk(9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(
            prob, prob.init_params(), tasks, target=target, solver="direct", solve_damping=0.5
        )
    assert res.diagnostics["regime"] in ("proximal", "indefinite")
    assert res.diagnostics["lambda_max"] >= res.diagnostics["lambda_min"]
    with pytest.warns(UserWarning):
        mf.removal_effects(
            prob, prob.init_params(), tasks, target=target, solver="direct", solve_damping=0.5
        )
