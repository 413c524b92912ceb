"""removal_effects(query_method='psg'|'jvp'): the core's query-point and task scores through
fused per-sample-gradient dots equal the mixed product's (float64, rel 1e-8)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from tests.toy_tasks import random_tasks


def tasks(M: int, seed: int) -> list[mf.Task]:
    return random_tasks(M, seed, classes=3)


INNERS = {
    "unrolled": lambda: mf.inner.Unrolled(steps=2, lr=0.3),
    "head_only": lambda: mf.inner.HeadOnly(head="2", steps=1, lr=0.5),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("method", ["psg", "jvp"])
def test_query_method_equals_mixed(inner, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    prob = mf.MetaProblem(model, inner=INNERS[inner](), damping=1e-2, chunk_size=3)
    lam, train = prob.init_params(), tasks(7, 0)
    kw = dict(target=tasks(2, 5), solver="direct", solve_damping=0.5, diagnostics=False)
    ref = mf.removal_effects(prob, lam, train, items="query_point", **kw)
    got = mf.removal_effects(prob, lam, train, items="query_point", query_method=method, **kw)
    q_ref, q_got = torch.stack(ref.scores), torch.stack(got.scores)
    assert torch.allclose(q_got, q_ref, rtol=1e-8, atol=1e-12 * float(q_ref.abs().max()))
    t_ref, t_got = ref.all_scores["task"], got.all_scores["task"]
    assert torch.allclose(t_got, t_ref, rtol=1e-8, atol=1e-12 * float(t_ref.abs().max()))
    assert got.all_scores["support_point"] is None
    assert got.task_ids == ref.task_ids


def test_query_method_errors():
    model = nn.Sequential(nn.Linear(3, 3)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.1))
    lam, train = prob.init_params(), tasks(3, 0)
    with pytest.raises(ValueError, match="query_method='fast'"):
        mf.removal_effects(prob, lam, train, target=tasks(1, 1), query_method="fast")
    with pytest.raises(ValueError, match="support-point scores"):
        mf.removal_effects(
            prob, lam, train, target=tasks(1, 1), items="support_point", query_method="jvp"
        )
