"""Engine for the unrolled (MAML) inner map, including head-only (ANIL) adaptation.

Every quantity is a block of the gradient or of a Hessian-vector product of the *weighted
meta-objective* of one chunk of ``M`` tasks

    Φ(λ, c, W, V) = Σ_k c_k F_k(λ, W_k, V_k),   F_k = L_O(θ_k(λ, W_k); Q_k, V_k),

with ``θ_k`` the ``T``-step unrolled inner map. All blocks come from ``torch.func`` over a
``vmap`` across tasks, so one call processes the whole chunk (second-order products reverse
over reverse, through one linearisation: :meth:`UnrolledEngine.linearised`):

- ``∂_λ Φ = Σ c_k g_k`` (the total gradients), ``∂_{c_k} Φ = F_k``;
- ``∇²Φ · (dλ, dc, dW, dV)`` — its λ-block with ``dc = dW = dV = 0`` is the total HVP; with
  ``dλ = s`` its ``c``, ``W`` and ``V`` blocks are ``sᵀ g_k``, ``∂_{w_kj}(c_k sᵀ g_k)`` and
  ``∂_{v_kq}(c_k sᵀ g_k)``, the removal-effect ingredients of math.md §3.

``first_order=True`` uses ``θ = λ + stopgrad_λ(θ(stopgrad(λ), W) − λ)``: ``dθ/dλ = I`` while
the dependence on the support weights ``W`` stays exact.

Head-only maps with a verified body/head split (:meth:`FunctionalModel.split`) evaluate the body
once per set and task (vmapped over the chunk) and run the inner steps on the features; the
derivatives in ``λ_f`` then pass through the body once (``cache_body=False``: the reference).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, vmap

from ..data.tasks import TaskBatch
from ._budget import LinearisationBudget, memory_in_use
from ._func import jvp, vjp
from .functional import FunctionalModel
from .inner import Unrolled

_TASK = (None, 0, 0, 0)  # in_dims for (λ, xs, ys, w)


class UnrolledEngine:
    """Batched unrolled-map computations for one chunk of tasks at fixed ``λ``."""

    def __init__(self, fm: FunctionalModel, inner: Unrolled, batch: TaskBatch, lam: Tensor):
        self.fm, self.inner, self.batch, self.lam = fm, inner, batch, lam
        self.spec = fm.spec
        self.split = fm.split(lam, batch.xs[0] if batch.num_tasks else None)
        self.linearisation_budget: LinearisationBudget | None = None  # set by the point
        self._lin: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]] | None = None
        self._grad: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    # ---- per-task pure functions ---------------------------------------------------------
    def _unroll(self, lam: Tensor, xs: Tensor, ys: Tensor, w: Tensor) -> Tensor:
        fixed, theta = self.spec.split(lam)
        join = self.spec.join
        fs = self.split.features(fixed, xs)  # the body once, outside the inner steps

        def inner_loss(th: Tensor) -> Tensor:
            return self.split.set_loss(fixed, th, fs, ys, w)

        for _ in range(int(self.inner.steps)):
            theta = theta - self.inner.lr * grad(inner_loss)(theta)
        return join(fixed, theta)

    def adapt_one(self, lam: Tensor, xs: Tensor, ys: Tensor, w: Tensor) -> Tensor:
        """``Θ(λ, w) [P]`` for one task (fixed block = λ's, adapted block unrolled)."""
        if self.inner.first_order:
            const = lam.detach()
            return lam + (self._unroll(const, xs, ys, w) - const)
        return self._unroll(lam, xs, ys, w)

    def task_objective(self, lam, xs, ys, xq, yq, w, v) -> Tensor:
        """``F_k(λ, w, v) = L_O(Θ(λ, w); Q, v)``."""
        return self.split.outer_loss(self.adapt_one(lam, xs, ys, w), xq, yq, v)

    def phi(self, lam: Tensor, c: Tensor, W: Tensor, V: Tensor) -> Tensor:
        b = self.batch
        f = vmap(self.task_objective, in_dims=(None, 0, 0, 0, 0, 0, 0))(
            lam, b.xs, b.ys, b.xq, b.yq, W, V
        )
        return (c * f).sum()

    # ---- public blocks -------------------------------------------------------------------
    def adapted(self) -> Tensor:
        """``Θ_k [M, P]``."""
        b = self.batch
        return vmap(self.adapt_one, in_dims=_TASK)(self.lam, b.xs, b.ys, b.support_weight)

    def task_losses(self) -> Tensor:
        """``F_k [M]`` (unweighted per-task outer losses)."""
        b = self.batch
        return vmap(self.task_objective, in_dims=(None, 0, 0, 0, 0, 0, 0))(
            self.lam, b.xs, b.ys, b.xq, b.yq, b.support_weight, b.query_weight
        )

    def grad_all(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(∂_λ Φ [P], ∂_c Φ [M], ∂_W Φ [M, n], ∂_V Φ [M, m])`` (no pass once
        :meth:`linearised` has been built: its primal is this gradient)."""
        if self._grad is not None:
            return self._grad
        c, W, V = self.batch.weights()
        return grad(self.phi, argnums=(0, 1, 2, 3))(self.lam, c, W, V)

    def task_grads(self) -> Tensor:
        """Total gradients ``g_k = D_λ F_k`` stacked ``[M, P]``."""
        b = self.batch
        return vmap(grad(self.task_objective), in_dims=(None, 0, 0, 0, 0, 0, 0))(
            self.lam, b.xs, b.ys, b.xq, b.yq, b.support_weight, b.query_weight
        )

    def linearised(self) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``(dλ, dc, dW, dV) ↦ ∇²Φ · (dλ, dc, dW, dV)`` (the four blocks), linearised once.

        Reverse over reverse: the graph of ``∇Φ`` (all four blocks) is built here, one
        gradient pass; each product is then one backward pass through it with the direction
        as cotangent (``∇²Φ`` is symmetric, so the pullback of ``∇Φ`` is the product); the
        build's own value, ``∇Φ``, is kept for :meth:`grad_all` (no second pass). On the
        Conv-4 job a product costs ≈ 1.9–2.5 gradients instead of ≈ 4.5 for forward over
        reverse. With a ``linearisation_budget`` (set by a :class:`BilevelPoint` of in-memory
        tasks; :mod:`._budget`) the graph — the activations of the chunk — is kept, when what
        its build added to the memory in use fits the budget, for all later products at this
        point: every solve iteration, the mixed product of the scores, an edit's right-hand
        side. Otherwise each call builds its own (the same operations: the same bits).
        """
        if self._lin is not None:
            return self._lin
        budget, device = self.linearisation_budget, self.lam.device
        before = memory_in_use(device) if budget is not None else None
        c, W, V = self.batch.weights()
        blocks, back = vjp(grad(self.phi, argnums=(0, 1, 2, 3)), self.lam, c, W, V)
        if not self.lam.requires_grad:  # the build's primal is the gradient: keep it
            self._grad = blocks

        def lin(dlam: Tensor, dc: Tensor, dW: Tensor, dV: Tensor):
            return back((dlam, dc, dW, dV))

        if budget is not None and before is not None:
            after = memory_in_use(device)
            if budget.take(None if after is None else after - before):
                self._lin = lin
        return lin

    def hvp_all(self, dlam: Tensor, dc: Tensor, dW: Tensor, dV: Tensor):
        """``∇²Φ (dλ, dc, dW, dV)`` → the four blocks (λ summed over tasks): :meth:`linearised`."""
        return self.linearised()(dlam, dc, dW, dV)

    def hvp_rows(self, D: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``∇²Φ · (d, 0, 0, 0)`` for each row of ``D [k, P]``, all four blocks stacked:
        ``([k, P], [k, M], [k, M, n], [k, M, m])`` — one backward pass per row through
        :meth:`linearised` gives the total HVP and the item blocks along ``d`` together (what
        a :class:`~metafluence.bilevel._tape.ProductTape` keeps)."""
        c, W, V = self.batch.weights()
        if D.shape[0] == 0:
            return D.new_zeros(D.shape), *(w.new_zeros(0, *w.shape) for w in (c, W, V))
        lin = self.linearised()
        zero = (torch.zeros_like(c), torch.zeros_like(W), torch.zeros_like(V))
        outs = [lin(d, *zero) for d in D]
        h_l, h_c, h_w, h_v = (torch.stack(b) for b in zip(*outs, strict=True))
        return h_l, h_c, h_w, h_v

    def hvp_exact(self, D: Tensor) -> Tensor:
        """``Σ_k c_k ∇²F_k · d`` for each row of ``D [k, P]`` (no damping): the ``λ``-block of
        :meth:`hvp_rows`."""
        return self.hvp_rows(D)[0]

    def theta_jvp(self, D: Tensor) -> tuple[Tensor, Tensor]:
        """``(Θ [M, P], dΘ [k, M, P])`` with ``dΘ_k = (∂Θ_k/∂λ) d`` for ``D [k, P]``."""
        b = self.batch

        def one(xs, ys, w, d):
            return jvp(lambda lam: self.adapt_one(lam, xs, ys, w), (self.lam,), (d,))[1]

        per_task = vmap(one, in_dims=(0, 0, 0, None))
        dtheta = vmap(lambda d: per_task(b.xs, b.ys, b.support_weight, d))(D)
        return self.adapted(), dtheta

    def theta_vjp(self, Y: Tensor) -> Tensor:
        """``Σ_k (∂Θ_k/∂λ)ᵀ y_k`` for ``Y [k, M, P]`` → ``[k, P]``."""
        b = self.batch

        def one(xs, ys, w, y):
            _, fn = vjp(lambda lam: self.adapt_one(lam, xs, ys, w), self.lam)
            return fn(y)[0]

        per_task = vmap(one)
        return vmap(lambda y: per_task(b.xs, b.ys, b.support_weight, y).sum(0))(Y)
