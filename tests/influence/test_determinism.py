"""Same seed, same inputs → bit-identical training and scores on CPU."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import metafluence as mf


def tasks(M, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        mf.Task(
            support=(torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)),
            query=(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)),
            id=i,
        )
        for i in range(M)
    ]


def run_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=1e-2)
    lam = mf.train.meta_train(
        prob, model, tasks(12, 0), steps=20, outer_lr=0.05, seed=3, batch_size=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(
            prob,
            lam,
            tasks(12, 0),
            target=tasks(3, 1),
            solver_kwargs={"maxiter": 20},
            solve_damping=0.1,
        )
    return lam, res


def test_same_seed_identical_scores():
    lam1, r1 = run_once()
    lam2, r2 = run_once()
    for k in lam1:
        assert torch.equal(lam1[k], lam2[k])
    assert torch.equal(r1.scores, r2.scores)
    for a, b in zip(r1.all_scores["support_point"], r2.all_scores["support_point"], strict=True):
        assert torch.equal(a, b)
    assert r1.diagnostics["lambda_min"] == r2.diagnostics["lambda_min"]
