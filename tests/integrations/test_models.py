"""Models from meta-learning libraries: plain module, learn2learn-style wrapper, higher-style
functional model give the same removal effects (learn2learn and higher are not installable here:
stand-ins reproduce their module structure and calling conventions)."""

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.integrations.models import FunctionalModel, inner_from_maml, unwrap
from tests._close import assert_close_normwise
from tests.toy_tasks import random_tasks

LR = 0.3


class MAML(nn.Module):
    """Stand-in for learn2learn.algorithms.MAML: holds `module`, `lr`, `first_order`."""

    def __init__(self, model, lr, first_order=False):
        super().__init__()
        self.module = model
        self.lr = lr
        self.first_order = first_order

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def tasks(M, seed):
    return random_tasks(M, seed)


def scores(model, inner, lam):
    problem = mf.MetaProblem(model, inner=inner, damping=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(
            problem,
            lam,
            tasks(6, 0),
            target=tasks(2, 1),
            curvature="gauss_newton",
            solve_damping=0.1,
            solver="direct",
            diagnostics=False,
        )
    return res.scores


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    lam = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return model, lam, scores(model, mf.inner.Unrolled(steps=1, lr=LR), lam)


def test_learn2learn_wrapper(reference):
    model, lam, ref = reference
    wrapped = MAML(model, lr=LR)
    inner = inner_from_maml(wrapped, steps=1)
    assert inner.lr == LR and not inner.first_order
    assert unwrap(wrapped) is model
    assert_close_normwise(scores(unwrap(wrapped), inner, lam), ref, rtol=1e-5)


def test_unwrap_nested_and_compiled(reference):
    model = reference[0]
    assert unwrap(nn.DataParallel(MAML(model, lr=LR))) is model
    assert unwrap(model) is model

    class OptimizedModule(nn.Module):  # torch.compile's wrapper keeps `_orig_mod`
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap(OptimizedModule(MAML(model, lr=LR))) is model


@pytest.mark.parametrize("style", ["higher", "func"])
def test_functional_model(reference, style):
    model, lam, ref = reference

    def mlp(x, params):
        w1, b1, w2, b2 = params
        return torch.tanh(x @ w1.T + b1) @ w2.T + b2

    fn = mlp if style == "higher" else (lambda params, x: mlp(x, params))
    fmodel = FunctionalModel(fn, [p.detach() for p in model.parameters()], style=style)
    torch.testing.assert_close(fmodel(torch.ones(2, 3)), model(torch.ones(2, 3)))
    assert_close_normwise(scores(fmodel, mf.inner.Unrolled(steps=1, lr=LR), lam), ref, rtol=1e-5)


def test_inner_from_maml_rejects_non_wrapper():
    with pytest.raises(TypeError):
        inner_from_maml(nn.Linear(2, 2))


def test_learn2learn_metasgd_and_others_rejected():
    class MetaSGD(MAML):
        pass

    with pytest.raises(TypeError, match="MetaSGD"):
        inner_from_maml(MetaSGD(nn.Linear(2, 2), lr=LR))
    with pytest.raises(TypeError, match="SGD"):
        inner_from_maml(torch.optim.Adam(nn.Linear(2, 2).parameters()))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("momentum", 0.9), ("weight_decay", 1e-4), ("maximize", True)],
)
def test_sgd_settings_without_unrolled_meaning_are_named(setting, value):
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=LR, **{setting: value})
    with pytest.raises(ValueError, match=setting):
        inner_from_maml(opt)


def test_torch_sgd_subset_gives_adapt():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model[2].parameters(), lr=LR)
    inner = inner_from_maml(opt, steps=3, model=model)
    assert inner.lr == LR and inner.steps == 3 and list(inner.adapt) == ["2.weight", "2.bias"]
    assert inner_from_maml(torch.optim.SGD(model.parameters(), lr=LR), model=model).adapt is None
