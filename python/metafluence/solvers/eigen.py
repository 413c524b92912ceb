"""Spectral estimates of a symmetric operator: power iteration and Lanczos / Arnoldi."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import (
    Matvec,
    RowOperator,
    check_device,
    check_dtype,
    check_positive_int,
    eps,
    random_rows,
    tiny,
)

__all__ = ["estimate_top_eigenvalue", "krylov_basis", "lanczos_extreme_eigenvalues"]


def power_iteration(
    op: RowOperator,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    iters: int,
    seed: int,
    rows: int = 1,
) -> float:
    """Power iteration on ``rows`` independent probes; the largest Rayleigh quotient.

    See :func:`estimate_top_eigenvalue`; ``rows > 1`` serves operators that need a fixed batch.
    """
    V = random_rows(rows, dim, dtype, device, seed)
    V = V / torch.linalg.vector_norm(V, dim=1, keepdim=True).clamp_min(tiny(dtype))
    lam = torch.zeros(rows, dtype=dtype, device=V.device)
    for _ in range(iters):
        W = op(V)
        lam = (V * W).sum(dim=1)
        V = W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(tiny(dtype))
    return float(lam.max().item())


def estimate_top_eigenvalue(
    matvec: Matvec,
    dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    iters: int = 20,
    seed: int = 0,
    batched: bool = False,
) -> float:
    """Estimate the eigenvalue of largest magnitude of a symmetric ``A`` by power iteration.

    ``v_0 ~ N(0, I_P)``; for ``t < iters``: ``λ_t = v_tᵀ A v_t`` (``||v_t|| = 1``),
    ``v_{t+1} = A v_t / ||A v_t||``. Returns the last Rayleigh quotient ``λ``, which for an SPD
    ``A`` satisfies ``λ <= λ_max`` (an underestimate). Uses ``iters`` matvecs and synchronises
    with the host once, at the end.

    Args:
        matvec: ``[P] -> [P]`` (or ``[1, P] -> [1, P]`` with ``batched=True``).
        dim: ``P``.
        dtype, device: of the probe vectors.
        iters: number of matvecs (``>= 1``).
        seed: seed of the CPU generator drawing ``v_0`` (same result on every device).
    """
    check_positive_int(dim, "dim")
    check_positive_int(iters, "iters")
    check_dtype(dtype)
    device = check_device(device)
    op = RowOperator(matvec, one_d=not batched)
    return power_iteration(op, dim, dtype, device, iters, seed)


def krylov_basis(
    op: RowOperator,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None,
    steps: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Orthonormal Krylov basis by Arnoldi (= Lanczos with full reorthogonalisation).

    Builds ``V = [v_1 .. v_m]`` (rows, ``[m, P]``, ``m = min(steps, P)``) with ``v_1`` random and
    ``h_{:, j} = Vᵀ A v_j`` orthogonalised away by two passes of classical Gram-Schmidt. When the
    Krylov space becomes invariant (``||w|| <= 1e3 · eps · ||A v_j||``), the next vector is a
    fresh random vector orthogonalised against ``V`` (and ``h_{j+1, j} = 0``), so that
    ``m = P`` steps always span the whole space (exact eigenvalues even with repeated ones).
    The breakdown test is a masked tensor operation: no host synchronisation inside the loop.

    Returns:
        ``V`` ``[m, P]`` and the symmetrised projection ``T = V A Vᵀ`` ``[m, m]``.
    """
    m = min(steps, dim)
    V = torch.zeros(m, dim, dtype=dtype, device=device)
    H = torch.zeros(m, m, dtype=dtype, device=device)
    fresh = random_rows(m, dim, dtype, device, seed)
    v = fresh[0] / torch.linalg.vector_norm(fresh[0]).clamp_min(tiny(dtype))
    breakdown_tol = 1e3 * eps(dtype)
    for j in range(m):
        V[j] = v
        w = op(v[None])[0]
        w_norm0 = torch.linalg.vector_norm(w)
        Vj = V[: j + 1]
        h = Vj @ w
        w = w - h @ Vj
        h2 = Vj @ w
        w = w - h2 @ Vj
        H[: j + 1, j] = h + h2
        if j + 1 == m:
            break
        beta = torch.linalg.vector_norm(w)
        ok = beta > breakdown_tol * w_norm0
        # replacement direction: a fresh random vector, orthogonalised twice against V
        r = fresh[j + 1]
        r = r - (Vj @ r) @ Vj
        r = r - (Vj @ r) @ Vj
        r = r / torch.linalg.vector_norm(r).clamp_min(tiny(dtype))
        v = torch.where(ok, w / beta.clamp_min(tiny(dtype)), r)
        H[j + 1, j] = torch.where(ok, beta, torch.zeros_like(beta))
    T = 0.5 * (H + H.T)
    return V, T


def lanczos_extreme_eigenvalues(
    matvec: Matvec,
    dim: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    steps: int = 20,
    seed: int = 0,
    batched: bool = False,
) -> tuple[float, float]:
    """Extreme eigenvalues ``(λ_min, λ_max)`` of a symmetric ``A`` (``[P, P]``) by Lanczos.

    Runs ``m = min(steps, P)`` Lanczos steps with full reorthogonalisation
    (:func:`krylov_basis`) and returns the extreme Ritz values, i.e. the extreme eigenvalues of
    ``T = V A Vᵀ``. By Cauchy interlacing ``λ_min(A) <= λ_min(T)`` and ``λ_max(T) <= λ_max(A)``;
    both are exact when ``steps >= P``. The largest eigenvalue converges fastest; the smallest of
    an ill-conditioned operator needs many steps (it is an upper bound until then).

    Args:
        matvec: ``[P] -> [P]`` (or ``[1, P] -> [1, P]`` with ``batched=True``).
        dim: ``P``; dtype, device: of the Lanczos vectors; seed: of the start vector.
    """
    check_positive_int(dim, "dim")
    check_positive_int(steps, "steps")
    check_dtype(dtype)
    device = check_device(device)
    op = RowOperator(matvec, one_d=not batched)
    _, T = krylov_basis(op, dim, dtype, device, steps, seed)
    ev = torch.linalg.eigvalsh(T)
    return float(ev[0].item()), float(ev[-1].item())
