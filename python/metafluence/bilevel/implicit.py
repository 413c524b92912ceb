"""Engine for the implicit (proximal, iMAML) inner map, including head-only adaptation.

Inner problem of task k (adapted block ``θ ∈ R^{p_a}``, fixed block ``λ_f``)::

    G_k(θ; λ, W_k) = L_I((λ_f, θ); S_k, W_k) + (γ/2)‖θ − λ_a‖²,   θ_k* = argmin_θ G_k,
    A_k = ∇²_θ G_k = ∇²_θ L_I + γI.

Derivatives through ``θ*`` use the adjoint (Lagrangian) form. With the adjoint
``a_k = A_k⁻¹ ∇_θ L_O(θ_k*)`` (one inner iHVP per task) define

    Lag_k(θ, λ, W_k, V_k) = L_O((λ_f, θ); Q_k, V_k) − ⟨∇_θ G_k(θ; λ, W_k), a_k⟩,
    Ψ(θ, λ, c, W, V) = Σ_k c_k Lag_k.

At ``(θ*, a)`` both ``∇_θ G = 0`` and ``∇_θ Ψ = 0``, hence for the reduced objective
``Φ(ξ) = Σ_k c_k F_k``, ``ξ = (λ, c, W, V)``:

- gradient: ``∇_ξ Φ = ∂_ξ Ψ`` (e.g. ``g_k = ∂_λ Lag_k``, which is ``γ a_k`` on the adapted block);
- Hessian (second-order adjoint; third derivatives of ``L_I`` enter through ``∇²Ψ``)::

      ∇²Φ = [I; θ_ξ]ᵀ ∇²_{(θ,ξ)} Ψ [I; θ_ξ],   θ_ξ = −A⁻¹ ∂_ξ ∇_θ G.

  Applied to ``dξ``: ``u = −A⁻¹ (∂_ξ∇_θG · dξ)``, ``(h_θ, h_ξ) = ∇²Ψ (u, dξ)``,
  result ``h_ξ − ∂_ξ ⟨∇_θ G, A⁻¹ h_θ⟩``: two inner iHVPs per direction and task.

Proof sketch: differentiate ``∇_ξΦ = ∂_ξΨ(θ(ξ), ξ, a(ξ))`` and eliminate ``a_ξ`` with the
derivative of the adjoint equation ``∇_θΨ = 0``; see the tests for the finite-difference check.

Inner solves (``Implicit.solver``) are batched over tasks and right-hand sides:
``"direct"`` (dense ``A_k``, Cholesky), ``"cg"`` (all tasks and columns in one CG),
``"woodbury"`` (the Gauss-Newton part ``γI + U Uᵀ`` of ``A_k``, ``U`` the ``n·C`` per-sample logit
Jacobians scaled by the loss Hessian: exact when the model is linear in ``θ``), ``"ekfac"``
(the paper's choice: EK-FAC of that Gauss-Newton part, per adapted ``nn.Linear`` layer, plus
``γI``; an approximation unless the model is one linear layer).

Head-only maps with a verified body/head split (:meth:`FunctionalModel.split`): ``∇_θ G``,
``A_k`` and the outer loss depend on ``λ_f`` only through the body features, so the engine caches
the features of every support and query set at ``λ`` once, runs the forward solve (gradient and
Newton steps, backtracking), every inner operator and solve on them, and evaluates the body
inside a ``λ``-derivative only once per set (``*_one`` functions on raw inputs compute the
features first and call the ``*_feat`` twins). ``cache_body=False`` is the reference path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vmap

from ..data.tasks import TaskBatch
from ..solvers import (
    WoodburyFactor,
    compute_kfac_factors_batched,
    solve_cg,
    solve_ekfac,
    woodbury_apply,
    woodbury_factor,
)
from ..solvers.newton import damped_newton
from ._func import jvp
from .ekfac_inner import EKFACLayout
from .functional import FunctionalModel
from .inner import Implicit
from .losses import cross_entropy, logit_hessian_sqrt, logit_hessian_vp, mse

#: the inner CG's relative tolerance is at least this many machine epsilons of the dtype (1.2e-4
#: in float32, 2.2e-13 in float64): the same rounding floor as the forward solve's ``‖∇_θ G‖``
_RTOL_FLOOR = 1e3


class ImplicitEngine:
    """Batched implicit-map computations for one chunk of tasks at fixed ``λ``."""

    def __init__(self, fm: FunctionalModel, inner: Implicit, batch: TaskBatch, lam: Tensor):
        self.fm, self.inner, self.batch, self.lam = fm, inner, batch, lam
        self.spec = fm.spec
        self.reg = float(inner.reg)
        self._dense: Tensor | None = None
        self._wood: WoodburyFactor | None = None
        self._ekfac: Any = None
        self._ekfac_layout = EKFACLayout(fm, inner) if inner.solver == "ekfac" else None
        self.inner_solves = 0
        self.inner_unconverged = 0
        self.split = fm.split(lam, batch.xs[0] if batch.num_tasks else None)
        self._fs, self._fq = self._features(lam)
        self.theta = self._forward_solve()
        self.adjoint = self.solve_A(self._outer_grad_theta())

    # ---- per-task pure functions ---------------------------------------------------------
    def _features(self, lam: Tensor) -> tuple[Tensor, Tensor]:
        """Body features of the chunk's support and query sets at ``λ`` (the inputs: no split)."""
        b = self.batch
        if not self.split.cached:
            return b.xs, b.xq
        fixed, _ = self.spec.split(lam.detach())
        feats = vmap(self.split.features, in_dims=(None, 0))
        with torch.no_grad():
            return feats(fixed, b.xs), feats(fixed, b.xq)

    def G_feat(self, theta: Tensor, lam: Tensor, fs: Tensor, ys: Tensor, w: Tensor) -> Tensor:
        """``G(θ; λ, w)`` on support features ``fs``."""
        fixed, lam_a = self.spec.split(lam)
        prox = 0.5 * self.reg * ((theta - lam_a) ** 2).sum()
        return self.split.set_loss(fixed, theta, fs, ys, w) + prox

    def gradG_feat(self, theta, lam, fs, ys, w) -> Tensor:
        return grad(self.G_feat)(theta, lam, fs, ys, w)

    def gradG_one(self, theta, lam, xs, ys, w) -> Tensor:
        fixed, _ = self.spec.split(lam)
        return self.gradG_feat(theta, lam, self.split.features(fixed, xs), ys, w)

    def outer_feat(self, theta, lam, fq, yq, v) -> Tensor:
        fixed, _ = self.spec.split(lam)
        return self.split.set_loss(fixed, theta, fq, yq, v)

    def outer_one(self, theta, lam, xq, yq, v) -> Tensor:
        fixed, _ = self.spec.split(lam)
        return self.outer_feat(theta, lam, self.split.features(fixed, xq), yq, v)

    def lag_one(self, theta, lam, xs, ys, xq, yq, w, v, a) -> Tensor:
        return (
            self.outer_one(theta, lam, xq, yq, v)
            - (self.gradG_one(theta, lam, xs, ys, w) * a).sum()
        )

    def psi(self, theta: Tensor, lam: Tensor, c: Tensor, W: Tensor, V: Tensor) -> Tensor:
        b = self.batch
        lag = vmap(self.lag_one, in_dims=(0, None, 0, 0, 0, 0, 0, 0, 0))(
            theta, lam, b.xs, b.ys, b.xq, b.yq, W, V, self.adjoint
        )
        return (c * lag).sum()

    # ---- inner operator and solves -------------------------------------------------------
    def _gradG(self, theta: Tensor) -> Tensor:
        b = self.batch
        return vmap(self.gradG_feat, in_dims=(0, None, 0, 0, 0))(
            theta, self.lam, self._fs, b.ys, b.support_weight
        )

    def A_mv(self, X: Tensor, theta: Tensor | None = None) -> Tensor:
        """``A_k x_k`` for ``X [L, M, p_a]`` (L right-hand sides per task)."""
        th = self.theta if theta is None else theta
        b = self.batch

        def one(t, fs, ys, w, x):
            return jvp(lambda tt: self.gradG_feat(tt, self.lam, fs, ys, w), (t,), (x,))[1]

        per_task = vmap(one, in_dims=(0, 0, 0, 0, 0))
        return vmap(lambda x: per_task(th, self._fs, b.ys, b.support_weight, x))(X)

    def _build(self, theta: Tensor) -> None:
        method = self.inner.solver
        b = self.batch
        if method == "direct":
            A = self._dense_A(theta)
            chol, info = torch.linalg.cholesky_ex(A)
            if bool((info != 0).any()):
                bad = [b.ids[i] for i in torch.nonzero(info).flatten().tolist()]
                raise ValueError(
                    f"inner Hessian A_k = ∇²L_I + γI is not positive definite for tasks {bad}: "
                    f"increase Implicit(reg=...) (now {self.reg})"
                )
            self._dense = chol
        elif method == "woodbury":
            self._wood = self._woodbury_factors(theta)
        elif method == "ekfac":
            assert self._ekfac_layout is not None
            acts, gouts = self._ekfac_layout.statistics(
                self.lam, theta, self.batch, self.split.logits, self._fs
            )
            self._ekfac = compute_kfac_factors_batched(acts, gouts)

    def _dense_A(self, theta: Tensor) -> Tensor:
        """``A_k = ∇²_θ L_I + γI`` stacked ``[M, p_a, p_a]`` (lower triangle used).

        A head that is one ``nn.Linear`` under a sample-separable loss (cross-entropy, mse) has
        logits linear in ``θ``, so its Hessian is the Gauss-Newton form
        ``Σ_j (w_j/n) J_jᵀ ∇²ℓ_j J_j`` exactly: ``C`` backward passes for the logit Jacobians
        ``J_j [C, p_a]`` and one batched product, instead of ``p_a`` backward passes (``jacrev``
        of ``∇_θ G``, the general path and reference).
        """
        b = self.batch
        head = getattr(self.split, "head", None)
        if isinstance(head, nn.Linear) and self.fm.loss_fn in (cross_entropy, mse):
            return self._gauss_newton_A(theta)

        def hess(t, fs, ys, w):
            return jacrev(lambda tt: self.gradG_feat(tt, self.lam, fs, ys, w))(t)

        A = vmap(hess)(theta, self._fs, b.ys, b.support_weight)
        return 0.5 * (A + A.transpose(1, 2))

    def _gauss_newton_A(self, theta: Tensor) -> Tensor:
        """``γI + Σ_j (w_j/n) J_jᵀ ∇²ℓ_j J_j`` from the cached features ``[M, p_a, p_a]``."""
        b = self.batch
        fixed, _ = self.spec.split(self.lam)
        n = b.n_support

        def one(t, fs, ys):
            def logits_of(tt):
                return self.split.logits(fixed, tt, fs)

            z = logits_of(t)
            C = z.shape[-1]
            eye = torch.eye(C, dtype=z.dtype, device=z.device)
            J = jacrev(logits_of)(t)  # [n, C, p_a]
            cols = vmap(lambda e: logit_hessian_vp(self.fm.loss_fn, z, ys, e.expand(n, C)))(eye)
            return J, cols.permute(1, 2, 0)  # [n, C, C]: column e of ∇²ℓ_j is cols[e, j]

        with torch.no_grad():
            J, H = vmap(one)(theta, self._fs, b.ys)  # [M, n, C, p], [M, n, C, C]
            HJ = torch.einsum("mnce,mnep,mn->mncp", H, J, b.support_weight / n)
            M, p = J.shape[0], J.shape[-1]
            A = J.reshape(M, -1, p).transpose(1, 2) @ HJ.reshape(M, -1, p)
            A.diagonal(dim1=1, dim2=2).add_(self.reg)
        return A

    def _woodbury_factors(self, theta: Tensor) -> WoodburyFactor:
        """``γI + U Uᵀ`` factored (:func:`metafluence.solvers.woodbury_factor`), with
        ``U [M, p_a, n·C]``, ``U Uᵀ = Σ_j (w_j/n) J_jᵀ ∇²ℓ_j J_j`` (``L_j L_jᵀ = ∇²ℓ_j``)."""
        b = self.batch
        fixed, _ = self.spec.split(self.lam)
        loss_fn = self.fm.loss_fn

        def one(t, fs, ys, w):
            def logits_of(tt):
                return self.split.logits(fixed, tt, fs)

            logits = logits_of(t)
            J = jacrev(logits_of)(t)  # [n, C, p_a]
            n = logits.shape[0]
            L = logit_hessian_sqrt(loss_fn, logits.reshape(n, -1), ys)  # [n, C, C]
            scale = (w.clamp_min(0) / n).sqrt()
            U = torch.einsum("ncp,ncr,n->pnr", J.reshape(n, -1, t.shape[0]), L, scale)
            return U.reshape(t.shape[0], -1)

        U = vmap(one)(theta, self._fs, b.ys, b.support_weight)
        return woodbury_factor(U, self.reg)

    def solve_A(self, B: Tensor, theta: Tensor | None = None) -> Tensor:
        """``A_k⁻¹ b_k`` for ``B [M, p_a]`` or ``[L, M, p_a]`` (batched over tasks and columns)."""
        squeeze = B.dim() == 2
        Bl = B.unsqueeze(0) if squeeze else B
        L, M, p = Bl.shape
        self.inner_solves += L * M
        method = self.inner.solver
        if theta is not None or (
            self._dense is None and self._wood is None and self._ekfac is None
        ):
            if method != "cg":
                self._build(self.theta if theta is None else theta)
        if method == "direct":
            assert self._dense is not None
            rhs = Bl.permute(1, 2, 0)  # [M, p, L]
            X = torch.cholesky_solve(rhs, self._dense).permute(2, 0, 1)
        elif method == "woodbury":
            assert self._wood is not None
            # (γI + UUᵀ)⁻¹ b = (b − U (γI_r + UᵀU)⁻¹ Uᵀ b) / γ, rows per task: [M, L, p]
            X = woodbury_apply(self._wood, Bl.transpose(0, 1)).transpose(0, 1)
        elif method == "ekfac":
            assert self._ekfac_layout is not None
            lay = self._ekfac_layout
            # A ≈ N'·F_EKFAC + γI  ⇒  A⁻¹b = (1/N') (F_EKFAC + (γ/N') I)⁻¹ b
            blocks = solve_ekfac(self._ekfac, lay.to_blocks(Bl), damping=self.reg / lay.samples)
            X = lay.from_blocks(blocks) / lay.samples
        else:

            def mv(rows: Tensor) -> Tensor:
                return self.A_mv(rows.view(L, M, p), theta).reshape(L * M, p)

            res = solve_cg(
                mv,
                Bl.reshape(L * M, p),
                # float32 residuals stagnate near eps·cond: below this floor CG ran to maxiter
                rtol=max(self.inner.rtol, _RTOL_FLOOR * torch.finfo(Bl.dtype).eps),
                maxiter=self.inner.maxiter,
                shrink=False,
            )
            if not res.converged:
                self.inner_unconverged += 1
            if res.negative_curvature:
                raise ValueError(
                    "inner Hessian A_k = ∇²L_I + γI has negative curvature: increase "
                    f"Implicit(reg=...) (now {self.reg})"
                )
            X = res.x.view(L, M, p)
        return X[0] if squeeze else X

    def _forward_solve(self) -> Tensor:
        _, lam_a = self.spec.split(self.lam)
        M = self.batch.num_tasks
        with torch.no_grad():
            theta = lam_a.detach().expand(M, -1).clone()
            for _ in range(int(self.inner.steps)):
                theta = theta - self.inner.lr * self._gradG(theta)
            grad0 = self._gradG(theta)
            norms = grad0.norm(dim=-1)  # [M]
            # rounding floor of ‖∇_θ G‖: a Newton step there no longer halves the norm (float32
            # never reaches the default tol; without this every task would run newton_steps)
            floor = _RTOL_FLOOR * torch.finfo(theta.dtype).eps * norms.clamp_min(1.0)
            # per-task damped Newton, backtracking on ‖∇_θ G_k‖ (12 step lengths)
            res = damped_newton(
                lambda th: (self._gradG(th), None),
                lambda th, g, _aux: self.solve_A(g, theta=th),
                theta,
                self.inner.newton_steps,
                trials=12,
                tol=self.inner.tol,
                floor=floor,
                batched=True,
                start=(grad0, None),
            )
            theta, norms = res.x, res.grad_norm
            gnorm = float(norms.max())
            self.inner_grad_norm = gnorm
            if self.inner.solver != "cg":
                self._build(theta)
        if self.inner_grad_norm > max(self.inner.tol, 1e-6):
            warnings.warn(
                f"implicit inner problem not solved: max ‖∇_θ G‖ = {self.inner_grad_norm:.3g} "
                "after the forward solve; raise Implicit(steps/newton_steps) or reg",
                RuntimeWarning,
                stacklevel=3,
            )
        return theta

    def _outer_grad_theta(self) -> Tensor:
        b = self.batch
        return vmap(grad(self.outer_feat), in_dims=(0, None, 0, 0, 0))(
            self.theta, self.lam, self._fq, b.yq, b.query_weight
        )

    # ---- public blocks -------------------------------------------------------------------
    def adapted(self) -> Tensor:
        fixed, _ = self.spec.split(self.lam)
        return self.spec.join(fixed.expand(self.theta.shape[0], -1), self.theta)

    def task_losses(self) -> Tensor:
        b = self.batch
        return vmap(self.outer_feat, in_dims=(0, None, 0, 0, 0))(
            self.theta, self.lam, self._fq, b.yq, b.query_weight
        )

    def grad_all(self):
        c, W, V = self.batch.weights()
        return grad(self.psi, argnums=(1, 2, 3, 4))(self.theta, self.lam, c, W, V)

    def task_grads(self) -> Tensor:
        b = self.batch
        return vmap(grad(self.lag_one, argnums=1), in_dims=(0, None, 0, 0, 0, 0, 0, 0, 0))(
            self.theta,
            self.lam,
            b.xs,
            b.ys,
            b.xq,
            b.yq,
            b.support_weight,
            b.query_weight,
            self.adjoint,
        )

    def _dG_dxi(self, dlam: Tensor, dW: Tensor) -> Tensor:
        """``∂_{(λ,W)} ∇_θ G · (dλ, dW)`` → ``[M, p_a]``."""
        b = self.batch

        def one(t, xs, ys, w, dw):
            return jvp(
                lambda lam, ww: self.gradG_one(t, lam, xs, ys, ww), (self.lam, w), (dlam, dw)
            )[1]

        return vmap(one, in_dims=(0, 0, 0, 0, 0))(self.theta, b.xs, b.ys, b.support_weight, dW)

    def _dG_adjoint(self, Z: Tensor, wrt_W: bool = False):
        """``∂_{(λ, W)} Σ_k ⟨∇_θ G_k(θ_k; λ, W_k), z_k⟩`` for ``Z [M, p_a]``."""
        b = self.batch

        def s(lam: Tensor, W: Tensor) -> Tensor:
            g = vmap(self.gradG_one, in_dims=(0, None, 0, 0, 0))(self.theta, lam, b.xs, b.ys, W)
            return (g * Z).sum()

        return grad(s, argnums=(0, 1))(self.lam, b.support_weight)

    def hvp_all(self, dlam: Tensor, dc: Tensor, dW: Tensor, dV: Tensor):
        c, W, V = self.batch.weights()
        u = -self.solve_A(self._dG_dxi(dlam, dW))
        g = grad(self.psi, argnums=(0, 1, 2, 3, 4))
        _, (h_t, h_l, h_c, h_w, h_v) = jvp(
            g, (self.theta, self.lam, c, W, V), (u, dlam, dc, dW, dV)
        )
        corr_l, corr_w = self._dG_adjoint(self.solve_A(h_t))
        return h_l - corr_l, h_c, h_w - corr_w, h_v

    def hvp_exact(self, D: Tensor) -> Tensor:
        """``Σ_k c_k ∇²_λ F_k · d`` for each row of ``D [k, P]``; inner solves batched over k."""
        c, W, V = self.batch.weights()
        zW = torch.zeros_like(W)
        R = vmap(lambda d: self._dG_dxi(d, zW))(D)  # [k, M, p_a]
        U = -self.solve_A(R)

        def psi_l(theta, lam):
            return self.psi(theta, lam, c, W, V)

        g = grad(psi_l, argnums=(0, 1))

        def one(u, d):
            return jvp(g, (self.theta, self.lam), (u, d))[1]

        h_t, h_l = vmap(one)(U, D)
        Z = self.solve_A(h_t)
        corr = vmap(lambda z: self._dG_adjoint(z)[0])(Z)
        return h_l - corr

    def linearised(self) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`hvp_all` (its inner solves depend on the direction: nothing to share)."""
        return self.hvp_all

    def theta_jvp(self, D: Tensor) -> tuple[Tensor, Tensor]:
        """``(Θ [M, P], dΘ [k, M, P])`` with ``dΘ_k = (d_f, θ_λ d)`` for ``D [k, P]``."""
        zW = torch.zeros_like(self.batch.support_weight)
        R = vmap(lambda d: self._dG_dxi(d, zW))(D)
        U = -self.solve_A(R)  # [k, M, p_a]
        d_f, _ = self.spec.split(D)
        dF = d_f.unsqueeze(1).expand(-1, U.shape[1], -1)
        return self.adapted(), self.spec.join(dF, U)

    def theta_vjp(self, Y: Tensor) -> Tensor:
        """``Σ_k (∂Θ_k/∂λ)ᵀ y_k`` for ``Y [k, M, P]`` → ``[k, P]``."""
        y_f, y_a = self.spec.split(Y)
        Z = self.solve_A(y_a)
        corr = vmap(lambda z: self._dG_adjoint(z)[0])(Z)  # [k, P]
        zeros = torch.zeros_like(corr[:, self.spec.p_fixed :])
        return self.spec.join(y_f.sum(1), zeros) - corr
