"""Support-point removal effects with the task's exact response to the removal.

First-order scores differentiate ``∇F`` in the point's weight (math.md §3): for a support point
``e = (k, j)``, ``W_kj ∂_{W_kj}⟨s, ∇F⟩``. A support point enters the task's objective through
the inner map, ``F_k(λ, W_k) = L_O(Θ(λ, W_k))``, which is nonlinear in ``W_k``; with few shots
one point is a large part of the support set and the derivative misjudges its removal. The
exact response keeps the Newton step in ``λ`` but recomputes the task's gradient without the
point::

    ∇F_{-e}(λ*) = c_k (∇_λ F_k(λ*, W_k^{-j}) − ∇_λ F_k(λ*, W_k))          (∇F(λ*) = 0)
    Δf_e ≈ −⟨s, ∇F_{-e}(λ*)⟩ = c_k (⟨s, ∇_λ F_k(W_k)⟩ − ⟨s, ∇_λ F_k(W_k^{-j})⟩),

``s = (H + δ'I)⁻¹∇f``. For tasks and query points (linear in their weights) it equals the
first-order score. ``⟨s, ∇_λ F_k⟩`` for every task is the ``c``-block of one mixed product
``∇²Φ·(s, 0, 0, 0)``, so the cost is ``n + 1`` such passes (``n`` support points per task),
each with column ``j`` of the support weights zeroed in every task at once; the inner map is
re-run on the reweighted support sets (an implicit map re-solves them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bilevel.engine import build_engine
from ..bilevel.point import BilevelPoint


def _directional(engine, s: Tensor) -> Tensor:
    """``⟨s, ∇_λ F_k⟩ [k]`` for the tasks of one chunk's engine (the ``c``-block of
    ``∇²Φ·(s, 0, 0, 0)``)."""
    c, W, V = engine.batch.weights()
    return engine.hvp_all(s, torch.zeros_like(c), torch.zeros_like(W), torch.zeros_like(V))[1]


def exact_support_scores(pt: BilevelPoint, s: Tensor) -> Tensor:
    """Removal effects ``[M, n]`` of every support point with the exact task response.

    Args:
        pt: the point at ``λ*`` (in memory or streamed, any inner map, sharded or not).
        s: the total solve ``(H + δ'I)⁻¹∇f`` ``[P]``.
    """
    lam, fm, inner = pt.lam, pt.problem.fm, pt.problem.inner
    s = s.detach()
    parts = []
    for _, build in pt.chunk_engines():
        engine = build()
        batch = engine.batch
        c, W, V = batch.weights()
        base = _directional(engine, s)
        cols = []
        for j in range(W.shape[1]):  # over support positions; tasks stay batched
            Wj = W.clone()
            Wj[:, j] = 0
            cols.append(_directional(build_engine(fm, inner, batch.with_weights(c, Wj, V), lam), s))
        without = torch.stack(cols, 1) if cols else W.new_zeros(W.shape[0], 0)
        # a point of weight 0 is not in the objective: removing it changes nothing
        parts.append(torch.where(W != 0, c[:, None] * (base[:, None] - without), 0.0).detach())
    n = pt.item_widths()[0]
    local = torch.cat(parts) if parts else lam.new_zeros(0, n)
    return pt.reduce.cat(local)
