"""The influence core gives the same scores on the native path as on the reference path
(float64, rel 1e-8): fused CG updates and per-sample-gradient dots run as C++ kernels with
``METAFLUENCE_BACKEND=native`` and as plain PyTorch with ``reference``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from tests.toy_tasks import random_tasks

pytestmark = pytest.mark.skipif(
    not mf.build_info()["native"]["loaded"], reason="the native extension is not built"
)


def tasks(M: int, seed: int) -> list[mf.Task]:
    return random_tasks(M, seed, classes=3)


def scores(monkeypatch, backend: str, query_method: str) -> torch.Tensor:
    monkeypatch.setenv("METAFLUENCE_BACKEND", backend)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=2, lr=0.3), damping=1e-2)
    res = mf.removal_effects(
        prob,
        prob.init_params(),
        tasks(6, 0),
        target=tasks(2, 4),
        items="query_point",
        solver="cg",
        solve_damping=1.0,
        solver_kwargs={"maxiter": 25, "rtol": 1e-12},
        diagnostics=False,
        query_method=query_method,
    )
    return torch.cat([res.all_scores["task"], torch.stack(res.scores).flatten(), res.solve.x])


@pytest.mark.parametrize("query_method", ["mixed", "psg"])
def test_native_equals_reference(monkeypatch, query_method):
    ref = scores(monkeypatch, "reference", query_method)
    nat = scores(monkeypatch, "native", query_method)
    assert torch.allclose(nat, ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))
