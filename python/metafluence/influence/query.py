"""Query-point removal scores through fused per-sample gradient dots (math.md §3).

For task ``k`` with adapted parameters ``Θ_k = Θ_k(λ)`` and the s-test ``s``, the score of query
point ``q`` is

    v_kq · ∂_{v_kq}(c_k sᵀ g_k) = v_kq (c_k / m_k) sᵀ D_λ ℓ(z_q; Θ_k)
                                = v_kq (c_k / m_k) ⟨u_k, ∇_Θ ℓ(z_q; Θ_k)⟩,   u_k = Θ_λ,k s,

because ``ℓ(z_q; ·)`` depends on ``λ`` only through ``Θ_k`` (chain rule; ``Θ_λ,k s`` is one
Jacobian-vector product through the inner map, :meth:`theta_jvp` of the engines). So the scores
of a chunk need one inner-map jvp and, per task, the dots of the ``m_k`` per-sample gradients at
``Θ_k`` with the single vector ``u_k``: :func:`metafluence.psg.per_sample_grad_dots` computes
them per layer from (activations, grad_outputs) without forming ``[m, P]``. This equals the
query block of the mixed product ``∇²Φ (s, 0, 0, 0)`` that ``removal_effects`` uses (tested to
rel 1e-8 in float64) without its second-order pass through the outer loss.

``method="jvp"`` is the task-batched twin: ``⟨u_k, ∇_Θ ℓ(z_q; Θ_k)⟩`` for all ``q`` at once is
the forward-mode derivative of the per-sample loss vector along ``u_k``, vmapped over the
chunk's tasks (one batched call instead of one psg call per task).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from ..bilevel._func import jvp
from ..bilevel.engine import Engine
from ..bilevel.point import BilevelPoint
from ..bilevel.problem import MetaProblem
from ..psg import per_sample_grad_dots

QUERY_METHODS = ("psg", "jvp")


def query_point_scores(
    problem: MetaProblem, engine: Engine, s: Tensor, method: str = "psg"
) -> Tensor:
    """Query-point removal scores ``[M_chunk, m]`` of one chunk's engine for the s-test ``s``.

    Args:
        problem: the :class:`MetaProblem` the engine belongs to.
        engine: one chunk's :class:`~metafluence.bilevel.engine.Engine` (its ``batch`` and
            ``theta_jvp``), e.g. ``problem.engine(meta_params, tasks)``.
        s: the s-test ``[P]`` (flat layout of ``problem.spec``).
        method: ``"psg"`` (per-task fused per-sample gradient dots) or ``"jvp"``.

    Returns:
        ``out[k, q] = v_kq (c_k/m_k) ⟨Θ_λ,k s, ∇_Θ ℓ(z_q; Θ_k)⟩`` — the rows of
        ``removal_effects(...).all_scores["query_point"]`` for the chunk's tasks.
    """
    if method not in QUERY_METHODS:
        raise ValueError(f"method={method!r}: expected one of {QUERY_METHODS}")
    P = problem.spec.size
    if s.dim() != 1 or s.shape[0] != P:
        raise ValueError(f"s has shape {tuple(s.shape)}, expected ({P},)")
    b = engine.batch
    c, _, V = b.weights()
    with torch.no_grad():
        theta, dtheta = engine.theta_jvp(s.detach().unsqueeze(0))
    theta, U = theta.detach(), dtheta[0].detach()  # [M, P], u_k = Θ_λ,k s
    if method == "jvp":
        dots = _dots_jvp(problem, theta, U, b.xq, b.yq)
    else:
        dots = _dots_psg(problem, theta, U, b.xq, b.yq)
    return (V * (c / b.n_query).unsqueeze(-1) * dots).detach()


def query_point_scores_all(
    problem: MetaProblem, pt: BilevelPoint, s: Tensor, method: str = "psg"
) -> Tensor:
    """Query-point removal scores of every task ``[M, m]`` for the s-test ``s``: the
    :func:`query_point_scores` of this process's chunks (``pt.engines``), concatenated over all
    processes (``pt.reduce``; a ``ShardedProblem``'s point covers this rank's tasks only)."""
    parts = [query_point_scores(problem, e, s, method) for e in pt.engines]
    local = torch.cat(parts) if parts else s.new_zeros(0, pt.item_widths()[1])
    return pt.reduce.cat(local.detach())


def _dots_psg(problem: MetaProblem, theta: Tensor, U: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    """``⟨u_k, ∇_Θ ℓ(z_q; Θ_k)⟩ [M, m]``, per task by :func:`per_sample_grad_dots`."""
    spec = problem.spec
    rows = []
    for k in range(theta.shape[0]):
        params = spec.unflatten(theta[k])
        vectors = {n: u.unsqueeze(0) for n, u in spec.unflatten(U[k]).items()}
        d = per_sample_grad_dots(problem.model, params, xq[k], yq[k], vectors, problem.loss_fn)
        rows.append(d[:, 0])
    if not rows:
        return theta.new_zeros(0, xq.shape[1])
    return torch.stack(rows)


def _dots_jvp(problem: MetaProblem, theta: Tensor, U: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
    """The same dots as forward-mode derivatives of the per-sample losses, vmapped over tasks."""
    fm = problem.fm

    def one(th: Tensor, u: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return jvp(lambda t: fm.per_sample_loss(t, x, y), (th,), (u,))[1]

    return vmap(one)(theta, U, xq, yq)
