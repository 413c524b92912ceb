"""The item blocks of a solve's own products: the scores' mixed product read off the solve.

One backward pass through a chunk's linearisation (:meth:`UnrolledEngine.linearised`) gives all
four blocks of ``∇²Φ · (d, 0, 0, 0)``: the total-Hessian product (``λ``-block) that a solver
asks for, and the item blocks ``∂_c∇Φ·d [M]``, ``∂_W∇Φ·d [M, n]``, ``∂_V∇Φ·d [M, m]`` that the
removal effects need along the solution ``s`` (math.md §3). The item blocks are linear in
``d``; a Krylov solve's solution lies in the span of the directions it multiplied
(``x = Σ_j α_j p_j`` for CG from ``x₀ = 0``). So, while a point records on a
:class:`ProductTape` (:meth:`BilevelPoint.recording`), each exact product keeps its directions
``D_j [k_j, P]`` and every chunk's item blocks along them; afterwards

    s = Σ_i a_i d_i   (least squares over the recorded rows, checked)   ⇒
    blocks(s) = Σ_i a_i blocks(d_i)

costs no pass over the tasks, where the mixed product costs one more product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Blocks = tuple[Tensor, Tensor, Tensor]


class ProductTape:
    """Directions of the exact products made while recording, and each chunk's item blocks.

    ``max_bytes`` bounds what is kept (directions and blocks); past it, or when a chunk's
    engine cannot give its item blocks with the product (``hvp_rows``), the tape is
    :attr:`valid` no more and answers nothing (the caller makes the mixed product instead).
    """

    #: the most a tape keeps (directions ``[k, P]`` and item blocks ``[k, M (1 + n + m)]``)
    MAX_BYTES = 1 << 28

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = self.MAX_BYTES if max_bytes is None else int(max_bytes)
        self.rows: list[Tensor] = []  # per product: its directions [k_j, P]
        self.blocks: list[list[Blocks]] = []  # per product: per chunk ([k_j, M_c], ...)
        self.valid = True
        self._bytes = 0
        self._basis: SpanBasis | None = None  # of the rows, made once for every coefficients()

    def invalidate(self) -> None:
        """Keep nothing more; answer nothing."""
        self.valid, self.rows, self.blocks, self._basis = False, [], [], None

    def record(self, D: Tensor, chunk_blocks: list[Blocks]) -> None:
        """Keep the directions ``D [k, P]`` of one product and each chunk's item blocks along
        them ``(c [k, M_c], W [k, M_c, n], V [k, M_c, m])``, in chunk order."""
        if not self.valid:
            return
        size = D.numel() * D.element_size()
        size += sum(b.numel() * b.element_size() for cb in chunk_blocks for b in cb)
        if self._bytes + size > self.max_bytes:
            self.invalidate()
            return
        self._bytes += size
        self._basis = None
        self.rows.append(D.detach().clone())  # a solver may update its directions in place
        self.blocks.append([tuple(b.detach() for b in cb) for cb in chunk_blocks])  # type: ignore[misc]

    def coefficients(self, s: Tensor) -> Tensor | None:
        """``a [N]`` with ``s ≈ Σ_i a_i d_i`` over the ``N`` recorded rows, or ``None`` when
        ``s [P]`` is not in their span to ``√eps`` (relative) or the combination would
        amplify the products' rounding by more than ``1/√eps``. The rows' basis is made once
        and serves every ``s`` (a solve's several columns, a check before the scores)."""
        if not self.valid or not self.rows:
            return None
        if self._basis is None:
            self._basis = SpanBasis(torch.cat(self.rows))
        basis = self._basis
        D = basis.D.to(s.dtype)  # [N, P]
        s_norm = float(torch.linalg.vector_norm(s))
        if s_norm == 0.0:
            return s.new_zeros(D.shape[0])
        a = basis.coefficients(s)
        if not bool(torch.isfinite(a).all()):
            return None
        tol = math.sqrt(torch.finfo(s.dtype).eps)
        miss = float(torch.linalg.vector_norm(a @ D - s))
        growth = float((a.abs() * basis.row_norms.to(s.dtype)).sum())
        if miss > tol * s_norm or growth * tol > s_norm:
            return None
        return a

    def chunk_blocks(self, chunk: int, a: Tensor) -> Blocks:
        """``Σ_i a_i blocks_i`` of chunk ``chunk`` (this process's chunks, in order):
        ``(∂_c∇Φ·s [M_c], ∂_W∇Φ·s [M_c, n], ∂_V∇Φ·s [M_c, m])``."""
        out: list[Tensor] = []
        for block in range(3):
            parts = [prod[chunk][block] for prod in self.blocks]
            stacked = torch.cat(parts).to(a.dtype)  # [N, M_c, ...]
            out.append(torch.tensordot(a, stacked, dims=1))
        return out[0], out[1], out[2]


class SpanBasis:
    """An orthonormal basis of the rows of ``D [N, P]``, for least squares in their span.

    Gram–Schmidt with reorthogonalisation on the rows (a row within ``10³·eps`` of the span of
    the earlier ones is left out, and gets ``a_i = 0``): ``Q [r, P]`` and the upper triangular
    ``R [r, r]`` with ``D[kept] = Rᵀ Q``. Plain tensor products only, so results are
    bit-reproducible (LAPACK least squares is not: its bits follow the memory alignment of its
    inputs).
    """

    def __init__(self, D: Tensor) -> None:
        N = D.shape[0]
        cut = 1e3 * torch.finfo(D.dtype).eps
        Q = D.new_zeros(0, D.shape[1])  # orthonormal rows [r, P]
        R = D.new_zeros(N, N)  # R[j, t]: row ``kept[t]`` on q_j
        kept: list[int] = []
        row_norms = torch.linalg.vector_norm(D, dim=1)
        for i in range(N):
            v, r = D[i], D.new_zeros(Q.shape[0])
            for _ in range(2):  # twice is enough (Kahan–Parlett)
                c = Q @ v
                v, r = v - c @ Q, r + c
            nv = torch.linalg.vector_norm(v)
            if float(nv) <= cut * float(row_norms[i]):
                continue
            t = len(kept)
            R[:t, t], R[t, t] = r, nv
            Q = torch.cat([Q, (v / nv).unsqueeze(0)])
            kept.append(i)
        self.D, self.row_norms, self.Q, self.R, self.kept = D, row_norms, Q, R, kept

    def coefficients(self, s: Tensor) -> Tensor:
        """``a [N]`` minimising ``‖Σ_i a_i d_i − s‖``: back substitution ``R a = Q s``."""
        r = len(self.kept)
        c = self.Q.to(s.dtype) @ s
        R = self.R.to(s.dtype)
        x = s.new_zeros(r)
        for t in reversed(range(r)):  # R[:r, :r] x = c, upper triangular
            x[t] = (c[t] - R[t, t + 1 : r] @ x[t + 1 :]) / R[t, t]
        a = s.new_zeros(self.D.shape[0])
        if self.kept:
            a[torch.tensor(self.kept, device=s.device)] = x
        return a


def span_coefficients(D: Tensor, s: Tensor) -> Tensor:
    """``a [N]`` minimising ``‖Σ_i a_i d_i − s‖`` over the rows of ``D [N, P]``
    (:class:`SpanBasis`)."""
    return SpanBasis(D).coefficients(s)
