"""Shared helpers for the solver tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def spd(
    P: int, cond: float, seed: int = 0, dtype: torch.dtype = torch.float64, lam_max: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """``A = Q diag(eigs) Qᵀ`` with eigenvalues log-spaced in ``[lam_max / cond, lam_max]``.

    Returns ``(A, Q, eigs)`` (float64 construction, cast to ``dtype``).
    """
    Q, _ = torch.linalg.qr(randn(P, P, seed=seed))
    eigs = lam_max * torch.logspace(
        0.0, -float(torch.log10(torch.tensor(cond))), P, dtype=torch.float64
    )
    A = (Q * eigs) @ Q.T
    A = 0.5 * (A + A.T)
    return A.to(dtype), Q.to(dtype), eigs.to(dtype)


def row_matvec(A: Tensor) -> Callable[[Tensor], Tensor]:
    """Matvec honouring the same-rank contract: ``[P] -> [P]`` and ``[k, P] -> [k, P]``."""

    def mv(x: Tensor) -> Tensor:
        return x @ A.T

    return mv


def dense_solve(A: Tensor, b: Tensor, damping: float = 0.0) -> Tensor:
    """Reference ``(A + damping I)⁻¹ b`` for ``b`` ``[P]`` or ``[k, P]`` (rows)."""
    M = A + damping * torch.eye(A.shape[0], dtype=A.dtype)
    if b.dim() == 1:
        return torch.linalg.solve(M, b)
    return torch.linalg.solve(M, b.T).T
