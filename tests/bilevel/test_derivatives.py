"""Finite-difference checks (float64) of every bilevel primitive for every inner map.

Total gradient ``∇F``, total HVP (exact curvature), and the mixed weight derivatives
``∂_{w_kj}(sᵀ∇F)`` / ``∂_{v_kq}(sᵀ∇F)`` / ``∂_{c_k}(sᵀ∇F)`` that removal effects are made of.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf

EPS = 1e-5


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def conv():
    torch.manual_seed(0)
    return TinyConv().double()


def tasks_for(shape, M=4, n=5, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(M):
        xs = torch.randn(n, *shape, generator=g, dtype=torch.float64)
        xq = torch.randn(m, *shape, generator=g, dtype=torch.float64)
        ys = torch.randint(0, 3, (n,), generator=g)
        yq = torch.randint(0, 3, (m,), generator=g)
        out.append(mf.Task(support=(xs, ys), query=(xq, yq), id=i))
    return out


INNERS = {
    "unrolled": lambda head: mf.inner.Unrolled(steps=2, lr=0.5),
    "implicit-direct": lambda head: mf.inner.Implicit(reg=4.0, solver="direct"),
    "implicit-cg": lambda head: mf.inner.Implicit(reg=4.0, solver="cg"),
    "headonly-unrolled": lambda head: mf.inner.HeadOnly(head=head, steps=3, lr=0.5),
    "headonly-implicit": lambda head: mf.inner.HeadOnly(head=head, reg=1.0, solver="direct"),
}
MODELS = {"mlp": (mlp, (4,), "2"), "conv": (conv, (1, 6, 6), "head")}


def rel(a, b):
    return float((a - b).norm() / b.norm())


def build(model_name, inner_name):
    make, shape, head = MODELS[model_name]
    model = make()
    prob = mf.MetaProblem(model, inner=INNERS[inner_name](head), damping=0.01)
    return prob, prob.flat(prob.init_params()), tasks_for(shape)


COMBOS = [
    (m, i) for m in MODELS for i in INNERS if not (m == "conv" and i == "implicit-cg")
]  # implicit-cg is checked on the MLP; the dense inner solve covers the conv net


@pytest.mark.parametrize("model_name,inner_name", COMBOS)
def test_total_gradient_and_hvp_finite_differences(model_name, inner_name):
    prob, lam, tasks = build(model_name, inner_name)
    g = torch.Generator().manual_seed(1)
    d = torch.randn(lam.shape[0], generator=g, dtype=torch.float64)
    batch = prob.batch(tasks, lam)

    def F(x):
        return prob.point(x, batch).objective()

    def grad(x):
        return prob.point(x, batch).meta_grad()

    pt = prob.point(lam, batch)
    fd = (F(lam + EPS * d) - F(lam - EPS * d)) / (2 * EPS)
    assert abs(float(pt.meta_grad() @ d) - float(fd)) <= 1e-6 * abs(float(fd))
    fd_h = (grad(lam + EPS * d) - grad(lam - EPS * d)) / (2 * EPS)
    assert rel(pt.hvp(d, "exact"), fd_h) < 1e-6
    # several right-hand sides at once give the same as one at a time
    D = torch.stack([d, 2 * d + 1])
    HD = pt.hvp(D, "exact")
    assert rel(HD[0], pt.hvp(d, "exact")) < 1e-10
    # task gradients sum to the meta-gradient
    tg = pt.task_grads()
    assert rel((batch.task_weight[:, None] * tg).sum(0) + prob.damping * lam, pt.meta_grad()) < 1e-9


@pytest.mark.parametrize("model_name,inner_name", COMBOS)
def test_weight_derivatives_finite_differences(model_name, inner_name):
    prob, lam, tasks = build(model_name, inner_name)
    batch = prob.batch(tasks, lam)
    s = torch.randn(lam.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pt = prob.point(lam, batch)
    _, h_c, h_w, h_v = pt.hvp_all(s)
    c, W, V = batch.weights()

    def sg(c_=None, W_=None, V_=None):
        b = batch.with_weights(c_, W_, V_)
        return float(s @ prob.point(lam, b).meta_grad())

    eps = 1e-5
    for k, j in [(0, 0), (2, 3)]:
        Wp, Wm = W.clone(), W.clone()
        Wp[k, j] += eps
        Wm[k, j] -= eps
        fd = (sg(W_=Wp) - sg(W_=Wm)) / (2 * eps)
        assert abs(float(h_w[k, j]) - fd) <= 1e-5 * max(abs(fd), 1e-8), (k, j)
        Vp, Vm = V.clone(), V.clone()
        Vp[k, j] += eps
        Vm[k, j] -= eps
        fd = (sg(V_=Vp) - sg(V_=Vm)) / (2 * eps)
        assert abs(float(h_v[k, j]) - fd) <= 1e-5 * max(abs(fd), 1e-8), (k, j)
    k = 1
    cp, cm = c.clone(), c.clone()
    cp[k] += eps
    cm[k] -= eps
    fd = (sg(c_=cp) - sg(c_=cm)) / (2 * eps)
    assert abs(float(h_c[k]) - fd) <= 1e-5 * abs(fd)


def test_first_order_gradient_is_fomaml():
    prob = mf.MetaProblem(mlp(), inner=mf.inner.Unrolled(steps=2, lr=0.5, first_order=True))
    lam = prob.flat(prob.init_params())
    tasks = tasks_for((4,))
    pt = prob.point(lam, tasks)
    theta = pt.adapted()
    b = pt.batch
    expected = torch.stack(
        [
            torch.func.grad(lambda t: prob.fm.set_loss(t, b.xq[k], b.yq[k], b.query_weight[k]))(
                theta[k]
            )
            for k in range(b.num_tasks)
        ]
    )
    assert rel(pt.task_grads(), expected) < 1e-12
    # curvature of the first-order map: the Hessian of the outer loss at θ (dθ/dλ = I)
    d = torch.randn(lam.shape[0], dtype=torch.float64)
    H = sum(
        b.task_weight[k]
        * torch.func.jvp(
            torch.func.grad(lambda t: prob.fm.set_loss(t, b.xq[k], b.yq[k], b.query_weight[k])),
            (theta[k],),
            (d,),
        )[1]
        for k in range(b.num_tasks)
    )
    assert rel(pt.hvp(d), H) < 1e-10


def test_gauss_newton_matches_explicit_jacobians():
    prob = mf.MetaProblem(mlp(), inner=mf.inner.Unrolled(steps=2, lr=0.5))
    lam = prob.flat(prob.init_params())
    tasks = tasks_for((4,), M=3)
    pt = prob.point(lam, tasks)
    b = pt.batch
    P = lam.shape[0]
    H = torch.zeros(P, P, dtype=torch.float64)
    for k in range(b.num_tasks):
        eng = pt.engines[0]

        def logits(x, k=k):
            th = eng.adapt_one(x, b.xs[k], b.ys[k], b.support_weight[k])
            return prob.fm.logits(th, b.xq[k])

        J = torch.func.jacrev(logits)(lam).reshape(-1, P)  # [m*C, P]
        lg = logits(lam)
        p = torch.softmax(lg, -1)
        G = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / lg.shape[0]
        H += b.task_weight[k] * J.T @ G @ J
    V = torch.randn(2, P, dtype=torch.float64)
    assert rel(pt.hvp(V, "gauss_newton"), V @ H) < 1e-10
    evals = torch.linalg.eigvalsh(pt.hvp(torch.eye(P, dtype=torch.float64), "gauss_newton"))
    assert float(evals.min()) > -1e-12
