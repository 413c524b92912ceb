"""The meta-objective linearised at ``λ``: total gradients and total-Hessian operators.

``F(λ) = Σ_i c_i L_O(θ_i(λ); Q_i, v_i) + (δ/2)‖λ‖²`` over a :class:`TaskBatch` processed in
chunks of tasks (each chunk one batched engine call, never a Python loop over tasks).

Curvatures of the total Hessian ``H`` (math.md §2), all ``x ↦ Hx`` operators on ``[k, P]``:

- ``"exact"``: ``Σ_i c_i D²_λ L_O^i + δI`` (second-order autodiff through the inner map);
- ``"gauss_newton"``: ``Σ_i c_i J_iᵀ G_i J_i + δI`` with ``J_i = ∂ logits(Q_i) / ∂λ`` through the
  inner map and ``G_i`` the loss Hessian in the logits (weighted ``v_q / m``); PSD;
- ``"gamma"`` (the paper's surrogate): ``Σ_i c_i Θ_λᵀ ∇²_Θ L_O^i Θ_λ + (Γ + δ) I`` with
  ``Γ = Σ_i c_i ‖∇_θ L_O^i‖₁`` (adapted block), i.e. the ``d²θ/dλ²`` terms dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from ._func import jvp, vjp
from .losses import logit_hessian_vp
from .tasks import TaskBatch

CURVATURES = ("exact", "gauss_newton", "gamma")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}: expected one of {CURVATURES}")
    return curvature


class BilevelPoint:
    """All first- and second-order quantities of the meta-objective at one ``λ``."""

    def __init__(self, problem: Any, lam: Tensor, batch: TaskBatch, chunk_size: int | None):
        self.problem, self.lam, self.batch = problem, lam, batch
        self.damping = float(problem.damping)
        M = batch.num_tasks
        cs = M if not chunk_size else max(1, int(chunk_size))
        self.engines = [
            problem._engine(batch.slice(i, min(M, i + cs)), lam) for i in range(0, M, cs)
        ]
        self._gamma: float | None = None

    # ---- reductions over chunks ----------------------------------------------------------
    def _cat(self, fn: Callable[[Any], Tensor], dim: int = 0) -> Tensor:
        return torch.cat([fn(e) for e in self.engines], dim=dim)

    def _sum(self, fn: Callable[[Any], Tensor]) -> Tensor:
        out = fn(self.engines[0])
        for e in self.engines[1:]:
            out = out + fn(e)
        return out

    # ---- values and gradients ------------------------------------------------------------
    def adapted(self) -> Tensor:
        """Adapted parameters ``Θ_i [M, P]`` (flat layout)."""
        return self._cat(lambda e: e.adapted())

    def task_losses(self) -> Tensor:
        """``L_O^i(θ_i(λ)) [M]``."""
        return self._cat(lambda e: e.task_losses())

    def objective(self) -> Tensor:
        """``F(λ)`` including the damping term."""
        f = (self.batch.task_weight * self.task_losses()).sum()
        return f + 0.5 * self.damping * (self.lam * self.lam).sum()

    def grad_all(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradient of ``Φ = Σ c_k F_k`` in ``(λ, c, W, V)``; λ-block includes ``δλ``."""
        parts = [e.grad_all() for e in self.engines]
        g_l = sum(p[0] for p in parts) + self.damping * self.lam
        return (
            g_l,
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
            torch.cat([p[3] for p in parts]),
        )

    def meta_grad(self) -> Tensor:
        """``∇F(λ) = Σ_i c_i g_i + δλ`` ``[P]``."""
        return self.grad_all()[0]

    def task_grads(self) -> Tensor:
        """Total gradients ``g_i [M, P]`` (materialised: use only where needed)."""
        return self._cat(lambda e: e.task_grads())

    # ---- second order ----------------------------------------------------------------------
    def hvp_all(
        self,
        dlam: Tensor,
        dc: Tensor | None = None,
        dW: Tensor | None = None,
        dV: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``∇²(Φ + δ/2‖λ‖²) · (dλ, dc, dW, dV)`` blocks, exact (mixed weight derivatives)."""
        b = self.batch
        dc = torch.zeros_like(b.task_weight) if dc is None else dc
        dW = torch.zeros_like(b.support_weight) if dW is None else dW
        dV = torch.zeros_like(b.query_weight) if dV is None else dV
        parts = []
        start = 0
        for e in self.engines:
            m = e.batch.num_tasks
            sl = slice(start, start + m)
            parts.append(e.hvp_all(dlam, dc[sl], dW[sl], dV[sl]))
            start += m
        h_l = sum(p[0] for p in parts) + self.damping * dlam
        return (
            h_l,
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
            torch.cat([p[3] for p in parts]),
        )

    def gamma_constant(self) -> float:
        """``Γ = Σ_i c_i ‖∇_θ L_O^i‖₁`` over the adapted block."""
        if self._gamma is None:
            fm, spec = self.problem.fm, self.problem.spec
            total = 0.0
            for e in self.engines:
                b = e.batch
                g = vmap(grad(fm.set_loss))(e.adapted(), b.xq, b.yq, b.query_weight)
                total += float((b.task_weight * g[:, spec.p_fixed :].abs().sum(-1)).sum())
            self._gamma = total
        return self._gamma

    def hvp(self, D: Tensor, curvature: str = "exact") -> Tensor:
        """Total-Hessian product ``H d`` (damping ``δ`` included) for ``D [P]`` or ``[k, P]``."""
        check_curvature(curvature)
        one = D.dim() == 1
        Dk = D.unsqueeze(0) if one else D
        if curvature == "exact":
            out = self._sum(lambda e: e.hvp_exact(Dk))
        elif curvature == "gauss_newton":
            out = self._sum(lambda e: self._gn_chunk(e, Dk))
        else:
            out = self._sum(lambda e: self._gamma_chunk(e, Dk)) + self.gamma_constant() * Dk
        out = out + self.damping * Dk
        return out[0] if one else out

    def _gn_chunk(self, e: Any, D: Tensor) -> Tensor:
        fm = self.problem.fm
        b = e.batch
        theta, dtheta = e.theta_jvp(D)
        m = b.n_query

        def task(th, dth, xq, yq, v, c):
            def logits_of(t):
                return fm.logits(t, xq)

            lg, jd = jvp(logits_of, (th,), (dth,))
            scale = (c * v / m).reshape(-1, *([1] * (lg.dim() - 1)))
            hd = logit_hessian_vp(fm.loss_fn, lg, yq, jd) * scale
            return vjp(logits_of, th)[1](hd)[0]

        per_task = vmap(task)
        Y = vmap(lambda dt: per_task(theta, dt, b.xq, b.yq, b.query_weight, b.task_weight))(dtheta)
        return e.theta_vjp(Y)

    def _gamma_chunk(self, e: Any, D: Tensor) -> Tensor:
        fm = self.problem.fm
        b = e.batch
        theta, dtheta = e.theta_jvp(D)

        def task(th, dth, xq, yq, v, c):
            def loss(t: Tensor) -> Tensor:
                return fm.set_loss(t, xq, yq, v)

            return c * jvp(grad(loss), (th,), (dth,))[1]

        per_task = vmap(task)
        Y = vmap(lambda dt: per_task(theta, dt, b.xq, b.yq, b.query_weight, b.task_weight))(dtheta)
        return e.theta_vjp(Y)

    def matvec(self, curvature: str = "exact", extra_damping: float = 0.0):
        """``x ↦ (H + δ'I) x`` as a solver ``matvec`` on ``[P]`` or ``[k, P]``."""
        check_curvature(curvature)

        def mv(X: Tensor) -> Tensor:
            return self.hvp(X, curvature) + extra_damping * X

        return mv

    # ---- diagnostics ---------------------------------------------------------------------
    def inner_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        norms = [getattr(e, "inner_grad_norm", None) for e in self.engines]
        found = [float(n) for n in norms if n is not None]
        if found:
            out["inner_grad_norm"] = max(found)
            out["inner_unconverged_solves"] = sum(e.inner_unconverged for e in self.engines)
        return out
