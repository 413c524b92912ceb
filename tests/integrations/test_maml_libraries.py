"""inner_from_maml against the real higher and learn2learn (each test skips without its library):
one call converts the library's inner loop, and metafluence's meta-gradient equals the one the
library's own training loop backpropagates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.integrations.models import inner_from_maml, unwrap
from tests._close import assert_close_normwise
from tests.toy_tasks import random_tasks

LR, STEPS = 0.3, 2


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def tasks():
    out = random_tasks(4, 0)
    for t in out:
        t.support = (t.support[0].double(), t.support[1])
        t.query = (t.query[0].double(), t.query[1])
    return out


def flat_grad(net):
    return torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.grad is not None])


def ce(logits, y):
    return nn.functional.cross_entropy(logits, y)


def metafluence_grad(net, inner):
    prob = mf.MetaProblem(net, inner=inner, damping=0.0)
    lam = prob.init_params()
    g = prob.meta_grad(lam, tasks())
    return prob.unflat(g)


@pytest.mark.parametrize("head_only", [False, True])
def test_higher_innerloop(head_only):
    higher = pytest.importorskip("higher")
    net = model()
    params = net[2].parameters() if head_only else net.parameters()
    opt = torch.optim.SGD(params, lr=LR)
    net.zero_grad()
    ts = tasks()
    for t in ts:
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(STEPS):
                diffopt.step(ce(fmodel(t.support[0]), t.support[1]))
            (ce(fmodel(t.query[0]), t.query[1]) / len(ts)).backward()
            inner = inner_from_maml(diffopt, steps=STEPS)  # one call
    assert inner.lr == LR and inner.steps == STEPS and not inner.first_order
    assert (list(inner.adapt) == ["2.weight", "2.bias"]) if head_only else inner.adapt is None
    ours = metafluence_grad(net, inner)
    ref = {n: p.grad for n, p in net.named_parameters()}
    assert_close_normwise(ours, ref, rtol=1e-10)


def test_higher_flags_and_fmodel():
    higher = pytest.importorskip("higher")
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    with higher.innerloop_ctx(net, opt, track_higher_grads=False) as (fmodel, diffopt):
        assert inner_from_maml(diffopt).first_order
        assert inner_from_maml(fmodel, lr=0.1).first_order
        with pytest.raises(TypeError, match="lr="):
            inner_from_maml(fmodel)
    adam = torch.optim.Adam(net.parameters())
    with higher.innerloop_ctx(net, adam) as (_, diffopt), pytest.raises(TypeError, match="Adam"):
        inner_from_maml(diffopt)


@pytest.mark.parametrize("first_order", [False, True])
def test_learn2learn_maml(first_order):
    l2l = pytest.importorskip("learn2learn")
    net = model()
    maml = l2l.algorithms.MAML(net, lr=LR, first_order=first_order)
    net.zero_grad()
    ts = tasks()
    for t in ts:
        learner = maml.clone()
        for _ in range(STEPS):
            learner.adapt(ce(learner(t.support[0]), t.support[1]))
        (ce(learner(t.query[0]), t.query[1]) / len(ts)).backward()
    inner = inner_from_maml(maml, steps=STEPS)  # one call
    assert inner.lr == LR and inner.first_order == first_order
    ours = metafluence_grad(unwrap(maml), inner)
    ref = {n: p.grad for n, p in net.named_parameters()}
    assert_close_normwise(ours, ref, rtol=1e-10)
