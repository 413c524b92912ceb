"""Inner solvers of the implicit map: direct (exact), cg, woodbury (GN part), ekfac (EK-FAC)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf


def tasks(M=5, d=4, classes=3):
    g = torch.Generator().manual_seed(0)
    return [
        mf.Task(
            support=(
                torch.randn(6, d, generator=g, dtype=torch.float64),
                torch.randint(0, classes, (6,), generator=g),
            ),
            query=(
                torch.randn(9, d, generator=g, dtype=torch.float64),
                torch.randint(0, classes, (9,), generator=g),
            ),
            id=i,
        )
        for i in range(M)
    ]


def task_grads(model, solver, reg):
    prob = mf.MetaProblem(model, inner=mf.inner.Implicit(reg=reg, solver=solver), damping=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prob.point(prob.init_params(), tasks()).task_grads().flatten()


def agree(a, b):
    rel = float((a - b).norm() / b.norm())
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return rel, corr


def test_linear_model_woodbury_is_exact_and_ekfac_close():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    ref = task_grads(model, "direct", 1.0)
    assert agree(task_grads(model, "woodbury", 1.0), ref)[0] < 1e-10
    assert agree(task_grads(model, "cg", 1.0), ref)[0] < 1e-8
    rel, corr = agree(task_grads(model, "ekfac", 1.0), ref)
    assert rel < 0.1 and corr > 0.99


def test_mlp_structured_solvers_track_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    ref = task_grads(model, "direct", 3.0)
    assert agree(task_grads(model, "cg", 3.0), ref)[0] < 1e-8
    for solver in ("woodbury", "ekfac"):
        rel, corr = agree(task_grads(model, solver, 3.0), ref)
        assert corr > 0.98, (solver, rel, corr)


def test_ekfac_needs_linear_layers():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Implicit(reg=1.0, solver="ekfac"))
    x = torch.randn(4, 1, 6, dtype=torch.float64)
    t = mf.Task(support=(x, torch.tensor([0, 1, 2, 0])), query=(x, torch.tensor([1, 1, 0, 2])))
    with pytest.raises(ValueError, match="nn.Linear layers only"):
        prob.outer_loss(prob.init_params(), [t])


def test_removal_effects_with_ekfac_head_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    prob = mf.MetaProblem(
        model, inner=mf.inner.HeadOnly(head="2", reg=1.0, solver="ekfac"), damping=0.01
    )
    ref = mf.MetaProblem(
        model, inner=mf.inner.HeadOnly(head="2", reg=1.0, solver="direct"), damping=0.01
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = mf.removal_effects(
            prob, prob.init_params(), tasks(), target=tasks(3), solver="direct", diagnostics=False
        )
        b = mf.removal_effects(
            ref, ref.init_params(), tasks(), target=tasks(3), solver="direct", diagnostics=False
        )
    assert mf.evaluate.correlation(a.scores, b.scores)["pearson"] > 0.95
