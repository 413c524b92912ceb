"""Baselines scored in the same harness and with the same sign as ``removal_effects``.

Every scorer returns :class:`BaselineScores` whose ``task`` entry is ``[M]`` and whose
``support_point`` / ``query_point`` entries (where the method defines them) are lists of ``M``
tensors, all in the convention of math.md §3: the *predicted change of the target loss when
the item is removed* — positive = the item helps, negative = the item is harmful. Scores of a
group add up.

- :func:`direct_if` — "Direct-IF", the naive extension that ignores the inner map: the
  meta-parameters are treated as if they *were* the adapted parameters (``θ = λ``): gradients
  are partial derivatives ``∇_θ L_O(θ_k)`` at the adapted parameters, the Hessian is
  ``Σ_k c_k ∇²_θ L_O(θ_k) + δI``, and support points are scored as ordinary training points at
  ``θ_k`` (``(c_k/n) sᵀ∇_θ ℓ(z_j; θ_k)``): the second-order path through the inner map is lost.
- :func:`ekfac_if` — single-level EK-FAC influence on the meta-parameters: total (meta)
  gradients ``g_k`` as in ``removal_effects``, but the total Hessian replaced by the EK-FAC
  curvature of the query losses at the adapted parameters (``Linear`` layers; other parameters
  get a scalar curvature), damped by ``0.1 · mean eigenvalue`` unless ``damping`` is given.
- :func:`tracin` — TracIn-style gradient dots ``η Σ_t c_k g_k(λ_t)ᵀ∇f(λ_t)`` over checkpoints
  (default: the final ``λ*`` only, ``η = 1``): influence with ``H = I``. Query points by
  fused per-sample gradient dots at the adapted parameters,
  ``v_kq (c_k/m) ⟨Θ_λ,k ∇f, ∇_Θ ℓ(z_q; Θ_k)⟩``
  (:func:`metafluence.influence.query.query_point_scores`), tasks as their sums
  (``g_k = Σ_q (v_kq/m) D_λ ℓ_q``); support points (which need the second-order ``∂_w Θ_λ``)
  by the mixed product of ``removal_effects`` with ``s = ∇f``.
- :func:`loss_ranking` — ``−loss``: high-loss items are ranked harmful (query loss after
  adaptation for tasks and query points; support loss after adaptation for support points).
- :func:`random_scores` — seeded standard normal scores.
- :func:`gradient_ascent_unlearn` — an *editing* baseline: a few steps of gradient ascent on
  the removed items' contribution to ``F`` (``λ ← λ + η(∇F − ∇F_{-R})``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..influence.query import query_point_scores_all
from ..influence.removal import TargetLike, target_gradient
from ..solvers import compute_kfac_factors, get_solver, solve_ekfac
from .groups import Group, group_reweighted

BASELINES = ("direct_if", "ekfac_if", "tracin", "loss", "random")


@dataclass
class BaselineScores:
    """``task`` ``[M]``; ``support_point`` / ``query_point``: lists of ``M`` tensors or None."""

    task: Tensor
    support_point: list[Tensor] | None = None
    query_point: list[Tensor] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, kind: str) -> Any:
        return getattr(self, kind)


def _mixed_scores(pt: Any, s: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(c⊙∂_c, W⊙∂_W, V⊙∂_V)`` of ``sᵀ∇_λΦ``: the removal-effect formulas for a given ``s``."""
    _, h_c, h_w, h_v = pt.hvp_all(s)
    c, W, V = pt.batch.weights()
    return (
        (c * h_c).detach(),
        list((W * h_w).detach().unbind(0)),
        list((V * h_v).detach().unbind(0)),
    )


# --- Direct-IF ----------------------------------------------------------------------------------


def direct_if(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike,
    solver: str = "direct",
    damping: float | None = None,
    solver_kwargs: Mapping[str, Any] | None = None,
) -> BaselineScores:
    """Naive Direct-IF (partial derivatives only; ``θ = λ``). ``damping`` defaults to ``δ``."""
    fm = problem.fm
    pt = problem.point(meta_params, train_tasks)
    b = pt.batch
    theta = pt.adapted().detach()  # [M, P]
    c, W, V = b.weights()
    delta = problem.damping if damping is None else float(damping)

    # target: partial gradient at the target tasks' adapted parameters
    if callable(target) and not isinstance(target, Sequence):
        gf = target_gradient(problem, pt.lam, target)
    else:
        tp = problem.point(pt.lam, target)  # type: ignore[arg-type]
        tb = tp.batch
        th_t = tp.adapted().detach()
        gt = vmap(grad(fm.set_loss))(th_t, tb.xq, tb.yq, tb.query_weight)
        gf = (tb.task_weight[:, None] * gt).sum(0)

    def hv(X: Tensor) -> Tensor:
        one = X.dim() == 1
        Xk = X.unsqueeze(0) if one else X

        def task_hvp(th, xq, yq, v, ck, d):
            return ck * jvp(grad(lambda t: fm.set_loss(t, xq, yq, v)), (th,), (d,))[1]

        per = vmap(vmap(task_hvp, in_dims=(0, 0, 0, 0, 0, None)), in_dims=(None,) * 5 + (0,))
        out = per(theta, b.xq, b.yq, V, c, Xk).sum(1) + delta * Xk
        return out[0] if one else out

    res = get_solver(solver)(hv, gf, **dict(solver_kwargs or {}))
    s = res.x.detach()
    gk = vmap(grad(fm.set_loss))(theta, b.xq, b.yq, V)  # partial ∇_θ L_O [M, P]
    task = c * (gk @ s)

    def point_dots(th, x, y):
        return jvp(lambda t: fm.per_sample_loss(t, x, y), (th,), (s,))[1]

    dq = vmap(point_dots)(theta, b.xq, b.yq)  # [M, m]
    ds = vmap(point_dots)(theta, b.xs, b.ys)  # [M, n]
    q = c[:, None] * V * dq / b.n_query
    sp = c[:, None] * W * ds / b.n_support
    return BaselineScores(
        task.detach(),
        list(sp.detach().unbind(0)),
        list(q.detach().unbind(0)),
        {"solve_iters": res.iters, "converged": res.converged},
    )


# --- EK-FAC -------------------------------------------------------------------------------------
def _linear_modules(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and f"{mname}.weight" in names:
            out.append((mname, mod))
    return out


def _capture(
    problem: MetaProblem, theta: Tensor, x: Tensor, y: Tensor, mods: list[tuple[str, nn.Linear]]
) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs (with a 1 for the bias) and per-sample output gradients of each Linear layer."""
    acts: dict[str, Tensor] = {}
    outs: dict[str, Tensor] = {}
    hooks = []
    for name, mod in mods:

        def hook(m, inp, out, name=name):
            acts[name] = inp[0].detach()
            outs[name] = out

        hooks.append(mod.register_forward_hook(hook))
    try:
        params = problem.spec.unflatten(theta.detach().requires_grad_(True))
        logits = problem.fm.call(problem.model, params, x)  # BatchNorm: no buffer writes
        loss = problem.fm.loss_fn(logits, y).sum()
        gouts = torch.autograd.grad(loss, [outs[n] for n, _ in mods])
    finally:
        for h in hooks:
            h.remove()
    A, G = [], []
    for (name, mod), g in zip(mods, gouts, strict=True):
        a = acts[name].reshape(-1, acts[name].shape[-1])
        if mod.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        A.append(a)
        G.append(g.detach().reshape(-1, g.shape[-1]))
    return A, G


def ekfac_if(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike,
    damping: float | None = None,
) -> BaselineScores:
    """Single-level EK-FAC influence on the meta-parameters (see the module docstring)."""
    pt = problem.point(meta_params, train_tasks)
    b = pt.batch
    spec = problem.spec
    theta = pt.adapted().detach()
    names = list(spec.names)
    mods = _linear_modules(problem.model, names)
    if not mods:
        raise ValueError("ekfac_if needs at least one nn.Linear layer among the meta-parameters")
    with torch.enable_grad():
        caps = [_capture(problem, theta[k], b.xq[k], b.yq[k], mods) for k in range(b.num_tasks)]
    A = [torch.cat([cp[0][i] for cp in caps]) for i in range(len(mods))]
    G = [torch.cat([cp[1][i] for cp in caps]) for i in range(len(mods))]
    factors = compute_kfac_factors(A, G, correct_eigenvalues=True)
    mean_eig = float(torch.cat([lf.eigvals.reshape(-1) for lf in factors.layers]).mean())
    damp = 0.1 * mean_eig if damping is None else float(damping)
    damp = damp + problem.damping

    gf = target_gradient(problem, pt.lam, target)
    views = spec.unflatten(gf)
    blocks = []
    for name, mod in mods:
        w = views[f"{name}.weight"]
        blocks.append(
            torch.cat([w, views[f"{name}.bias"][:, None]], 1) if mod.bias is not None else w
        )
    sol = solve_ekfac(factors, blocks, damping=damp)
    out = {n: views[n] / (mean_eig + damp) for n in names}  # scalar curvature elsewhere
    for (name, mod), x in zip(mods, sol, strict=True):
        if mod.bias is not None:
            out[f"{name}.weight"], out[f"{name}.bias"] = x[:, :-1], x[:, -1]
        else:
            out[f"{name}.weight"] = x
    s = spec.flatten(out).to(gf.dtype)
    task, sp, q = _mixed_scores(pt, s)
    return BaselineScores(task, sp, q, {"damping": damp, "mean_eigenvalue": mean_eig})


# --- TracIn, loss, random -----------------------------------------------------------------------
def tracin(
    problem: MetaProblem,
    meta_params: ParamsLike | Sequence[ParamsLike],
    train_tasks: TasksLike,
    target: TargetLike,
    lrs: Sequence[float] | None = None,
    support_points: bool = True,
    method: str = "psg",
) -> BaselineScores:
    """``Σ_t η_t c_k g_k(λ_t)ᵀ∇f(λ_t)``; ``meta_params`` may be a list of checkpoints.

    Task and query-point scores come from per-sample gradient dots (``method`` = ``"psg"`` or
    ``"jvp"``, see :func:`metafluence.influence.query.query_point_scores`); ``support_points=False``
    skips the mixed product that the support-point scores need (``support_point`` is then None).
    """
    ckpts = list(meta_params) if isinstance(meta_params, (list, tuple)) else [meta_params]
    lrs = [1.0] * len(ckpts) if lrs is None else list(lrs)
    q_tot: Tensor | None = None
    sp_tot: Tensor | None = None
    for lam, eta in zip(ckpts, lrs, strict=True):
        pt = problem.point(lam, train_tasks)
        gf = target_gradient(problem, pt.lam, target)
        q = query_point_scores_all(problem, pt, gf, method)
        q_tot = eta * q if q_tot is None else q_tot + eta * q
        if support_points:
            h_w = pt.hvp_all(gf)[2]
            sp = eta * (pt.batch.support_weight * h_w).detach()
            sp_tot = sp if sp_tot is None else sp_tot + sp
    assert q_tot is not None
    return BaselineScores(
        q_tot.sum(1),
        None if sp_tot is None else list(sp_tot.unbind(0)),
        list(q_tot.unbind(0)),
        {"checkpoints": len(ckpts), "method": method},
    )


def loss_ranking(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike | None = None,
) -> BaselineScores:
    """``−loss`` after adaptation (tasks: query loss; points: their own loss)."""
    pt = problem.point(meta_params, train_tasks)
    b = pt.batch
    theta = pt.adapted().detach()
    fm = problem.fm
    with torch.no_grad():
        lq = vmap(fm.per_sample_loss)(theta, b.xq, b.yq)
        ls = vmap(fm.per_sample_loss)(theta, b.xs, b.ys)
        task = -pt.task_losses().detach()
    return BaselineScores(task, list((-ls).unbind(0)), list((-lq).unbind(0)))


def random_scores(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike | None = None,
    seed: int = 0,
) -> BaselineScores:
    """Seeded N(0, 1) scores of every item (the chance level of each metric)."""
    lam = problem.flat(meta_params)
    b = problem.batch(train_tasks, lam)
    g = torch.Generator().manual_seed(int(seed))
    M, n, m = b.num_tasks, b.n_support, b.n_query
    t = torch.randn(M, generator=g, dtype=torch.float64)
    sp = torch.randn(M, n, generator=g, dtype=torch.float64)
    q = torch.randn(M, m, generator=g, dtype=torch.float64)
    return BaselineScores(t, list(sp.unbind(0)), list(q.unbind(0)))


def score_all(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike,
    methods: Sequence[str] = BASELINES,
    **kwargs: Any,
) -> dict[str, BaselineScores]:
    """Every baseline in ``methods`` (names of :data:`BASELINES`) → scores."""
    fns = {
        "direct_if": direct_if,
        "ekfac_if": ekfac_if,
        "tracin": tracin,
        "loss": loss_ranking,
        "random": random_scores,
    }
    return {
        m: fns[m](problem, meta_params, train_tasks, target, **kwargs.get(m, {})) for m in methods
    }


# --- editing baseline ---------------------------------------------------------------------------
def gradient_ascent_unlearn(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    remove: Group,
    steps: int = 5,
    lr: float = 0.1,
    items: str | None = None,
) -> dict[str, Tensor]:
    """``steps`` of ``λ ← λ + lr·(∇F(λ) − ∇F_{-R}(λ))``: ascent on the removed items' part of
    ``F`` (for tasks: ``Σ_{k∈R} c_k ∇L_O^k``), the usual unlearning-by-ascent edit."""
    lam = problem.flat(meta_params).clone()
    full = problem.batch(train_tasks, lam)
    kept = group_reweighted(full, remove, 0.0, items)
    for _ in range(int(steps)):
        g_full = problem.point(lam, full).meta_grad()
        g_kept = problem.point(lam, kept).meta_grad()
        lam = lam + float(lr) * (g_full - g_kept).detach()
    return problem.unflat(lam)
