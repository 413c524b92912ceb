"""Closed-form bilevel toy (math.md §5.1): linear model, squared loss, proximal inner map.

Everything is an explicit function of ``(λ, c, W, V)`` built from dense linear solves, so its
derivatives (by autograd through ``torch.linalg.solve``) are an independent reference for the
iterative, adjoint-based machinery of the package.
"""

from __future__ import annotations

import torch
from torch import nn

import metafluence as mf


def make_tasks(M: int, d: int = 5, n: int = 10, m: int = 10, seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    tasks = []
    for i in range(M):
        th = mu + spread * torch.randn(d, generator=g, dtype=torch.float64)
        xs = torch.randn(n, d, generator=g, dtype=torch.float64)
        xq = torch.randn(m, d, generator=g, dtype=torch.float64)
        ys = xs @ th + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        yq = xq @ th + 0.3 * torch.randn(m, generator=g, dtype=torch.float64)
        tasks.append(mf.Task(support=(xs, ys), query=(xq, yq), id=i))
    return tasks


def problem(d: int, reg: float, damping: float, solver: str = "direct") -> mf.MetaProblem:
    model = nn.Linear(d, 1, bias=False).double()
    return mf.MetaProblem(
        model, loss="mse", inner=mf.inner.Implicit(reg=reg, solver=solver), damping=damping
    )


class ClosedForm:
    """``F(λ, c, W, V) = Σ_k c_k L_O(θ_k) + δ/2‖λ‖²`` with ``θ_k`` from a dense solve."""

    def __init__(self, tasks, reg: float, damping: float):
        b = mf.TaskBatch.from_tasks(tasks)
        self.Xs, self.ys, self.Xq, self.yq = b.xs, b.ys, b.xq, b.yq
        self.c, self.W, self.V = b.weights()
        self.reg, self.damping = reg, damping
        self.d = self.Xs.shape[-1]

    def theta(self, lam, W):
        n = self.Xs.shape[1]
        eye = torch.eye(self.d, dtype=lam.dtype)
        A = 2 * torch.einsum("knd,kn,kne->kde", self.Xs, W, self.Xs) / n + self.reg * eye
        bs = 2 * torch.einsum("knd,kn,kn->kd", self.Xs, W, self.ys) / n
        return torch.linalg.solve(A, (bs + self.reg * lam).unsqueeze(-1)).squeeze(-1)

    def task_losses(self, lam, W, V):
        r = torch.einsum("kqd,kd->kq", self.Xq, self.theta(lam, W)) - self.yq
        return (V * r * r).sum(1) / self.Xq.shape[1]

    def F(self, lam, c=None, W=None, V=None):
        c = self.c if c is None else c
        W = self.W if W is None else W
        V = self.V if V is None else V
        return (c * self.task_losses(lam, W, V)).sum() + 0.5 * self.damping * (lam * lam).sum()

    def grad(self, lam):
        return torch.func.grad(self.F)(lam)

    def hessian(self, lam):
        return torch.func.hessian(self.F)(lam)

    def minimiser(self, c=None):
        lam0 = torch.zeros(self.d, dtype=torch.float64)
        H = torch.func.hessian(lambda x: self.F(x, c))(lam0)
        g0 = torch.func.grad(lambda x: self.F(x, c))(lam0)
        return torch.linalg.solve(H, -g0)

    def loo_minimisers(self):
        """``λ*_{-k}`` for every k at once (each task's loss is quadratic in λ)."""
        lam0 = torch.zeros(self.d, dtype=torch.float64)
        Hk = torch.func.hessian(lambda x: self.task_losses(x, self.W, self.V))(lam0)  # [M,d,d]
        gk = torch.func.jacrev(lambda x: self.task_losses(x, self.W, self.V))(lam0)  # [M,d]
        eye = self.damping * torch.eye(self.d, dtype=torch.float64)
        H = torch.einsum("k,kde->de", self.c, Hk) + eye
        g = torch.einsum("k,kd->d", self.c, gk)
        H_loo = H - self.c[:, None, None] * Hk
        g_loo = g - self.c[:, None] * gk
        return torch.linalg.solve(H_loo, -g_loo)

    def scores(self, lam, s):
        """``ω ⊙ ∂_ω (sᵀ∇_λF)`` for ω = c, W, V."""

        def sg(c, W, V):
            return (s * torch.func.grad(lambda x: self.F(x, c, W, V))(lam)).sum()

        gc, gW, gV = torch.func.grad(sg, argnums=(0, 1, 2))(self.c, self.W, self.V)
        return self.c * gc, self.W * gW, self.V * gV
