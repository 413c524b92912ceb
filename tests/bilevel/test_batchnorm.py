"""BatchNorm in training mode (MAML's transductive batch statistics) in every inner map.

A small Conv-4-style net whose last BatchNorm sees ``1×1`` feature maps (a per-channel batch of
one value per point: a one-point forward fails there), with and without running-statistics
buffers. Each inner map is checked against finite differences of its own objective (float64),
the objective and its meta-gradient against a plain-autograd MAML loop with the model in
training mode, and the buffers are never written. (``F.batch_norm``'s second derivatives under
``vmap`` are wrong in torch 2.13; metafluence evaluates BatchNorm from elementary ops.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf

EPS = 1e-5


class ConvBN(nn.Module):
    """Three ``conv3×3 stride 2 → BatchNorm → tanh`` blocks on ``1×8×8`` → ``4×1×1`` → head."""

    def __init__(self, track_running_stats: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(3):
            layers += [
                nn.Conv2d(c, 4, 3, padding=1, stride=2),
                nn.BatchNorm2d(4, track_running_stats=track_running_stats),
                nn.Tanh(),
            ]
            c = 4
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x))


def model(track: bool) -> ConvBN:
    torch.manual_seed(0)
    return ConvBN(track).double().train()


def tasks(M=3, n=6, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def xy(k):
        x = torch.randn(k, 1, 8, 8, generator=g, dtype=torch.float64)
        return x, torch.randint(0, 3, (k,), generator=g)

    return [mf.Task(support=xy(n), query=xy(m), id=i) for i in range(M)]


# full adaptation of a BatchNorm net is far from convex at initialisation (the loss is invariant
# to the scale of each conv's weights): the proximal map needs a large γ there
INNERS = {
    "unrolled": mf.inner.Unrolled(steps=2, lr=0.3),
    "unrolled-first-order": mf.inner.Unrolled(steps=2, lr=0.3, first_order=True),
    "implicit-direct": mf.inner.Implicit(reg=100.0, solver="direct"),
    "implicit-cg": mf.inner.Implicit(reg=100.0, solver="cg"),
    "anil-unrolled": mf.inner.HeadOnly(head="head", steps=3, lr=0.5),
    "anil-implicit": mf.inner.HeadOnly(head="head", reg=1.0, solver="direct"),
}


def buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


@pytest.mark.parametrize("inner_name", list(INNERS))
def test_every_inner_map_with_running_stats_matches_finite_differences(inner_name):
    net = model(track=True)
    before = buffers(net)
    prob = mf.MetaProblem(net, inner=INNERS[inner_name], damping=0.01)
    lam = prob.flat(prob.init_params())
    batch = prob.batch(tasks(), lam)
    d = torch.randn(lam.shape[0], generator=torch.Generator().manual_seed(1), dtype=lam.dtype)

    def F(x):
        return float(prob.point(x, batch).objective())

    pt = prob.point(lam, batch)
    fd = (F(lam + EPS * d) - F(lam - EPS * d)) / (2 * EPS)
    g = pt.meta_grad()
    if not getattr(INNERS[inner_name], "first_order", False):  # FOMAML's is not a gradient
        assert abs(float(g @ d) - fd) <= 1e-5 * abs(fd)
        fd_h = (
            prob.point(lam + EPS * d, batch).meta_grad()
            - prob.point(lam - EPS * d, batch).meta_grad()
        ) / (2 * EPS)
        hd = pt.hvp(d, "exact")
        assert float((hd - fd_h).norm() / fd_h.norm()) < 1e-5
    after = buffers(net)
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics written"
    assert net.body[1].track_running_stats  # restored


@pytest.mark.parametrize("inner_name", ["unrolled", "anil-unrolled", "anil-implicit"])
@pytest.mark.parametrize("items", ["task", "support_point", "query_point"])
def test_removal_effects_run(inner_name, items):
    net = model(track=True)
    before = buffers(net)
    prob = mf.MetaProblem(net, inner=INNERS[inner_name], damping=0.01)
    lam = prob.init_params()
    res = mf.removal_effects(
        prob,
        lam,
        tasks(),
        target=tasks(M=2, seed=5),
        items=items,
        curvature="gauss_newton",
        solve_damping=0.1,
    )
    scores = res.scores if items == "task" else torch.cat(list(res.scores))
    assert scores.shape[0] == {"task": 3, "support_point": 18, "query_point": 15}[items]
    assert bool(torch.isfinite(scores).all())
    assert all(torch.equal(before[k], v) for k, v in buffers(net).items())


@pytest.mark.parametrize("inner_name", ["unrolled", "implicit-cg", "anil-unrolled"])
def test_running_stats_or_not_same_batch_statistics(inner_name):
    """Training mode normalises by batch statistics whether or not buffers exist."""
    out = []
    for track in (False, True):
        prob = mf.MetaProblem(model(track), inner=INNERS[inner_name], damping=0.01)
        lam = prob.flat(prob.init_params())
        out.append(prob.meta_grad(lam, tasks()))
    assert torch.equal(out[0], out[1])


def test_objective_is_maml_with_per_set_batch_statistics():
    """F(λ) against a plain-autograd MAML step (the model itself in training mode, one forward
    per support set and per query set): BatchNorm normalises each set by its own statistics."""
    net = model(track=False)
    lr = 0.3
    prob = mf.MetaProblem(net, inner=mf.inner.Unrolled(steps=1, lr=lr), damping=0.0)
    lam = prob.init_params()
    ts = tasks()
    losses = []
    for t in ts:
        params = {k: v.clone().requires_grad_(True) for k, v in lam.items()}
        xs, ys = t.support
        inner = nn.functional.cross_entropy(torch.func.functional_call(net, params, (xs,)), ys)
        grads = torch.autograd.grad(inner, list(params.values()))
        adapted = {k: v - lr * gk for (k, v), gk in zip(params.items(), grads, strict=True)}
        xq, yq = t.query
        logits = torch.func.functional_call(net, adapted, (xq,))
        losses.append(nn.functional.cross_entropy(logits, yq))
    ref = torch.stack(losses).mean()
    assert abs(float(prob.outer_loss(lam, ts)) - float(ref)) <= 1e-12 * float(ref)


def test_eval_mode_uses_running_statistics():
    """In eval mode the running statistics are constants of the model (no batch statistics)."""
    net = model(track=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    prob = mf.MetaProblem(net, inner=INNERS["anil-unrolled"], damping=0.01)
    lam = prob.flat(prob.init_params())
    g_train = prob.meta_grad(lam, tasks())
    net.eval()
    before = buffers(net)
    prob_eval = mf.MetaProblem(net, inner=INNERS["anil-unrolled"], damping=0.01)
    g_eval = prob_eval.meta_grad(lam, tasks())
    assert bool(torch.isfinite(g_eval).all()) and not torch.allclose(g_eval, g_train)
    assert all(torch.equal(before[k], v) for k, v in buffers(net).items())


@pytest.mark.parametrize("inner_name", ["implicit-cg", "anil-implicit-cg"])
def test_float32_implicit_inner_cg_converges(inner_name):
    """float32 inner CG solves stop at the dtype's rounding floor instead of running to maxiter
    (what made the implicit map look hung on a BatchNorm Conv-4)."""
    inner = (
        INNERS["implicit-cg"]
        if inner_name == "implicit-cg"
        else mf.inner.HeadOnly(head="head", reg=1.0, solver="cg")
    )
    prob = mf.MetaProblem(model(track=True).float(), inner=inner, damping=0.01)
    lam = prob.init_params()
    ts = [
        mf.Task(
            support=(t.support[0].float(), t.support[1]),
            query=(t.query[0].float(), t.query[1]),
            id=t.id,
        )
        for t in tasks()
    ]
    pt = prob.point(lam, ts)
    engine = pt.engines[0]
    assert engine.inner_solves > 0 and engine.inner_unconverged == 0
    assert bool(torch.isfinite(pt.meta_grad()).all())
