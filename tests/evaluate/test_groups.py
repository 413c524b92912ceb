"""Leave-group-out on the closed-form toy (math.md §5.1): exact where first order is exact."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import metafluence as mf
from tests.influence.closed_form import ClosedForm, make_tasks, problem

D, REG, DAMP, M = 4, 1.0, 0.01, 24
EPS = 1e-4


@pytest.fixture(scope="module")
def toy():
    tasks = make_tasks(M, d=D, seed=3)
    target = make_tasks(8, d=D, seed=4)
    cf = ClosedForm(tasks, REG, DAMP)
    lam = cf.minimiser()
    prob = problem(D, REG, DAMP)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(prob, lam, tasks, target=target, solver="direct")
    return prob, lam, tasks, target, res


GROUPS = [
    {"task": [0, 5, 9]},
    {"task": [2], "support_point": [(3, 1), (7, 0)]},
    {"query_point": [(1, 2), (1, 3), (10, 0)]},
    {"task": list(range(12, 24))},
]


def test_infinitesimal_group_equals_sum_of_scores(toy):
    prob, lam, tasks, target, res = toy
    plus = mf.evaluate.leave_group_out(prob, lam, tasks, target, GROUPS, factor=1 + EPS)
    minus = mf.evaluate.leave_group_out(prob, lam, tasks, target, GROUPS, factor=1 - EPS)
    fd = -(plus - minus) / (2 * EPS)
    pred = mf.evaluate.predicted_group_effects(None, GROUPS, all_scores=res.all_scores)
    assert torch.allclose(fd, pred, rtol=1e-6, atol=1e-12), (fd, pred)


def test_whole_group_removal_first_order_and_delta_lambda(toy):
    prob, lam, tasks, target, res = toy
    groups = [[k] for k in range(0, M, 3)] + [[1, 4], [2, 7, 11]]
    df, dl = mf.evaluate.leave_group_out(
        prob, lam, tasks, target, groups, items="task", return_params=True
    )
    pred = mf.evaluate.predicted_group_effects(res.scores, groups, items="task")
    st = mf.evaluate.correlation(pred, df)
    assert st["spearman"] > 0.95 and st["rel_error"] < 0.25, st
    # Δλ of one group: param_influence (one solve) against the retrained change
    dlam = mf.param_influence(prob, lam, tasks, remove={"task": groups[-1]}, solver="direct")
    pred_dl = prob.spec.flatten(dlam)
    assert mf.evaluate.relative_error(pred_dl, dl[-1]) < 0.25
    # the same through a process pool (fork) gives the same numbers
    df2 = mf.evaluate.leave_group_out(prob, lam, tasks, target, groups[:3], items="task", workers=2)
    assert torch.allclose(df2, df[:3], rtol=1e-9, atol=1e-14)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork pool on posix only")
def test_dead_worker_is_noticed_and_the_rest_runs_here(toy):
    """A worker that dies (as a child forked while another thread held a lock can) must not
    hang the pool: a warning, then the groups are retrained in this process."""
    prob, lam, tasks, target, _ = toy
    groups = [[k] for k in range(4)]
    parent, base = os.getpid(), mf.evaluate.newton_retrain(prob)

    def dies_in_a_child(batch, start):
        if os.getpid() != parent:
            os._exit(3)
        return base(batch, start)

    serial = mf.evaluate.leave_group_out(prob, lam, tasks, target, groups, items="task")
    with pytest.warns(RuntimeWarning, match="worker process died"):
        got = mf.evaluate.leave_group_out(
            prob, lam, tasks, target, groups, items="task", workers=2, retrain=dies_in_a_child
        )
    assert torch.equal(got, serial)


def test_group_validation(toy):
    prob, lam, tasks, target, _ = toy
    with pytest.raises(ValueError):
        mf.evaluate.leave_group_out(prob, lam, tasks, target, [[0]])  # needs items=
    with pytest.raises(ValueError):
        mf.evaluate.leave_group_out(prob, lam, tasks, target, [{"task": [M]}])


def test_leave_one_out_reports_each_retrains_convergence(toy):
    """Every retrain is checked: converged ones are reported as such, a retrainer that stops
    short is named in a warning with its ‖∇F_-e‖ (issue 16: Δf from an unconverged retrain
    looked like ground truth)."""
    prob, lam, tasks, target, _ = toy
    details: list = []
    mf.evaluate.leave_one_out(prob, lam, tasks, target, indices=[0, 3], details=details)
    assert [d["item"] for d in details] == [0, 3]
    assert all(d["converged"] and d["grad_norm"] <= 1e-6 for d in details)
    short: list = []
    with pytest.warns(RuntimeWarning, match=r"2 of 2 retrains did not reach.*0 \(‖∇F‖ ="):
        df = mf.evaluate.leave_one_out(
            prob, lam, tasks, target, indices=[0, 3], retrain=lambda b: lam, details=short
        )
    assert torch.equal(df, torch.zeros(2, dtype=df.dtype))
    assert not any(d["converged"] for d in short) and all(d["grad_norm"] > 1e-6 for d in short)
