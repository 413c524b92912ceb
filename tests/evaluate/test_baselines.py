"""Each baseline runs and scores label-flipped tasks as harmful (negative, math.md §3 sign).

Toy: 2-D linear-boundary tasks, a 2-5-2 tanh MLP, one-step MAML; 3 of 12 training tasks have
every query label flipped (so the outer loss pulls λ towards the wrong map: harmful for the
clean target tasks by construction).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf

M, N_S, N_Q = 12, 6, 10
BAD = [1, 6, 9]


def _tasks(M, seed, bad=()):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.tensor([1.5, -1.0], dtype=torch.float64)
    out = []
    for i in range(M):
        w = w0 + 0.3 * torch.randn(2, generator=g, dtype=torch.float64)
        xs = torch.randn(N_S, 2, generator=g, dtype=torch.float64)
        xq = torch.randn(N_Q, 2, generator=g, dtype=torch.float64)
        ys, yq = (xs @ w > 0).long(), (xq @ w > 0).long()
        if i in bad:  # every query label flipped: the task pulls λ towards the wrong map
            yq = 1 - yq
        out.append(mf.Task(support=(xs, ys), query=(xq, yq), id=i))
    return out


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=1e-2)
    tasks, target = _tasks(M, 1, BAD), _tasks(6, 2)
    lam = mf.train.meta_train(prob, model, tasks, steps=60, outer_lr=0.1)
    return prob, lam, tasks, target


def _harmful(scores):
    bad = torch.zeros(M, dtype=torch.bool)
    bad[BAD] = True
    return float(scores[bad].max()), float(scores[~bad].min()), bad


@pytest.mark.parametrize("method", ["direct_if", "ekfac_if", "tracin", "loss"])
def test_baseline_scores_flipped_tasks_harmful(trained, method):
    prob, lam, tasks, target = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = mf.evaluate.baselines.score_all(prob, lam, tasks, target, methods=[method])[method]
    assert out.task.shape == (M,)
    assert len(out.support_point) == M and out.support_point[0].shape == (N_S,)
    assert len(out.query_point) == M and out.query_point[0].shape == (N_Q,)
    worst_bad, best_clean, bad = _harmful(out.task)
    assert worst_bad < 0, (method, out.task)  # documented sign: harmful → negative
    assert mf.evaluate.detection_auc(out.task, bad) == 1.0, (method, out.task)


def test_influence_and_random_and_tracin_checkpoints(trained):
    prob, lam, tasks, target = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(
            prob,
            lam,
            tasks,
            target=target,
            solver="direct",
            curvature="gauss_newton",
            diagnostics=False,
        )
    assert mf.evaluate.detection_auc(res.scores, _harmful(res.scores)[2]) == 1.0
    r = mf.evaluate.random_scores(prob, lam, tasks)
    assert r.task.shape == (M,) and torch.equal(
        r.task, mf.evaluate.random_scores(prob, lam, tasks).task
    )
    # TracIn over two checkpoints = the sum of the two single-checkpoint scores
    lam2 = {k: v * 0.9 for k, v in lam.items()}
    t2 = mf.evaluate.tracin(prob, [lam, lam2], tasks, target, lrs=[1.0, 0.5])
    a = mf.evaluate.tracin(prob, lam, tasks, target).task
    b = mf.evaluate.tracin(prob, lam2, tasks, target).task
    assert torch.allclose(t2.task, a + 0.5 * b)


def test_gradient_ascent_unlearning_lowers_target_loss(trained):
    prob, lam, tasks, target = trained
    f0 = mf.evaluate.target_value(prob, lam, target)
    edited = mf.evaluate.gradient_ascent_unlearn(
        prob, lam, tasks, BAD, steps=3, lr=0.2, items="task"
    )
    assert mf.evaluate.target_value(prob, edited, target) < f0


@pytest.mark.parametrize("method", ["psg", "jvp"])
def test_tracin_equals_materialised_gradient_dots(trained, method):
    """TracIn by fused dots = the same dots from materialised per-sample gradients ``[m, P]``."""
    prob, lam, tasks, target = trained
    out = mf.evaluate.tracin(prob, lam, tasks, target, method=method)
    pt = prob.point(lam, tasks)
    gf = mf.influence.target_gradient(prob, pt.lam, target)
    b = pt.batch
    c, W, V = b.weights()
    theta, dtheta = pt.engines[0].theta_jvp(gf.unsqueeze(0))
    fm = prob.fm
    G = torch.func.vmap(torch.func.jacrev(fm.per_sample_loss))(theta, b.xq, b.yq)  # [M, m, P]
    q_ref = V * (c / N_Q)[:, None] * torch.einsum("kmp,kp->km", G, dtheta[0])
    assert torch.allclose(torch.stack(out.query_point), q_ref, rtol=1e-10, atol=1e-14)
    task_ref = c * (pt.task_grads() @ gf)
    assert torch.allclose(out.task, task_ref, rtol=1e-10, atol=1e-14)
    _, h_c, h_w, _ = pt.hvp_all(gf)
    assert torch.allclose(torch.stack(out.support_point), W * h_w, rtol=1e-10, atol=1e-14)
    lean = mf.evaluate.tracin(prob, lam, tasks, target, support_points=False, method=method)
    assert lean.support_point is None and torch.allclose(lean.task, out.task)
