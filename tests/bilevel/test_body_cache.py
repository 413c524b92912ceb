"""Head-only (ANIL) engines with cached body features equal the uncached reference (float64).

``FunctionalModel.cache_body=False`` runs the whole model inside every inner step (the path
before the cache); every engine block, total-Hessian curvature and removal score must agree to
rel 1e-10, and the split must actually be taken (or refused) where expected.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf

from .test_derivatives import TinyConv, tasks_for

TOL = 1e-10


class Scaled(TinyConv):
    """The head's output is post-processed: no body/head split may be taken."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def mlp():
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    )


MODELS = {
    "mlp": (mlp, (4,), "2"),  # a nested head of two layers
    "conv": (TinyConv, (1, 6, 6), "head"),
}
INNERS = {
    "unrolled": lambda h: mf.inner.HeadOnly(head=h, steps=3, lr=0.5),
    "unrolled-fo": lambda h: mf.inner.HeadOnly(head=h, steps=2, lr=0.5, first_order=True),
    "implicit-direct": lambda h: mf.inner.HeadOnly(head=h, reg=1.0, solver="direct"),
    "implicit-cg": lambda h: mf.inner.HeadOnly(head=h, reg=1.0, solver="cg"),
    "implicit-woodbury": lambda h: mf.inner.HeadOnly(head=h, reg=1.0, solver="woodbury"),
    "implicit-ekfac": lambda h: mf.inner.HeadOnly(head=h, reg=1.0, solver="ekfac"),
}


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def blocks(prob, lam, tasks):
    """Every engine block and curvature, as a flat list of tensors."""
    pt = prob.point(lam, tasks)
    (eng,) = pt.engines
    g = torch.Generator().manual_seed(3)
    P = lam.numel()
    D = torch.randn(2, P, generator=g, dtype=lam.dtype)
    b = eng.batch
    dc = torch.randn(b.task_weight.shape, generator=g, dtype=lam.dtype)
    dW = torch.randn(b.support_weight.shape, generator=g, dtype=lam.dtype)
    dV = torch.randn(b.query_weight.shape, generator=g, dtype=lam.dtype)
    Y = torch.randn(2, b.num_tasks, P, generator=g, dtype=lam.dtype)
    out = [eng.adapted(), eng.task_losses(), *eng.grad_all(), eng.task_grads()]
    out += list(eng.hvp_all(D[0], dc, dW, dV)) + [eng.hvp_exact(D)]
    out += list(eng.theta_jvp(D)) + [eng.theta_vjp(Y)]
    out += [pt.hvp(D, c) for c in ("exact", "gauss_newton", "gamma")]
    return eng, out


@pytest.mark.parametrize("inner_name", list(INNERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_cached_body_equals_reference(model_name, inner_name):
    make, shape, head = MODELS[model_name]
    torch.manual_seed(0)
    model = make().double()
    prob = mf.MetaProblem(model, inner=INNERS[inner_name](head), damping=0.01)
    lam = prob.flat(prob.init_params())
    tasks = tasks_for(shape)
    eng, fast = blocks(prob, lam, tasks)
    assert eng.split.cached, "the body/head split was not taken"
    prob.fm.cache_body = False
    eng_ref, ref = blocks(prob, lam, tasks)
    assert not eng_ref.split.cached
    for i, (a, r) in enumerate(zip(fast, ref, strict=True)):
        assert a.shape == r.shape, i
        assert rel(a, r) <= TOL, (i, rel(a, r))


def test_removal_scores_equal_reference():
    make, shape, head = MODELS["conv"]
    torch.manual_seed(0)
    prob = mf.MetaProblem(make().double(), inner=INNERS["implicit-cg"](head), damping=0.01)
    lam = prob.flat(prob.init_params())
    tasks, target = tasks_for(shape), tasks_for(shape, M=2, seed=1)

    def scores():
        with warnings.catch_warnings():  # 3 CG iterations: any s compares the two paths
            warnings.simplefilter("ignore", RuntimeWarning)
            r = mf.removal_effects(
                prob,
                lam,
                tasks,
                target=target,
                solver="cg",
                solver_kwargs={"maxiter": 3},
                diagnostics=False,
            )
        return [r.all_scores["task"], *r.all_scores["support_point"], *r.all_scores["query_point"]]

    fast = scores()
    prob.fm.cache_body = False
    ref = scores()
    for a, r in zip(fast, ref, strict=True):
        assert rel(a, r) <= TOL


def test_split_refused_when_head_output_is_post_processed():
    torch.manual_seed(0)
    model = Scaled().double()
    prob = mf.MetaProblem(model, inner=INNERS["implicit-direct"]("head"), damping=0.01)
    lam = prob.flat(prob.init_params())
    tasks = tasks_for((1, 6, 6))
    pt = prob.point(lam, tasks)
    assert not pt.engines[0].split.cached
    # and the result is the model's (scaled) loss, not the head's
    b = pt.engines[0].batch
    want = torch.stack(
        [
            prob.fm.set_loss(t, x, y, v)
            for t, x, y, v in zip(pt.adapted(), b.xq, b.yq, b.query_weight, strict=True)
        ]
    )
    assert rel(pt.task_losses(), want) <= TOL


def test_split_not_taken_for_full_maml_or_partial_head():
    torch.manual_seed(0)
    model = TinyConv().double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    full = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1))
    assert not full.fm.split(full.flat(full.init_params()), x).cached
    # only the head's weight adapted: the head module also holds a fixed parameter
    part = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, adapt=["head.weight"]))
    assert not part.fm.split(part.flat(part.init_params()), x).cached
    anil = mf.MetaProblem(model, inner=mf.inner.HeadOnly("head", steps=1))
    split = anil.fm.split(anil.flat(anil.init_params()), x)
    assert split.cached and split.path == "head"
