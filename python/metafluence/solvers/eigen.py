"""Spectral estimates of a symmetric operator: power iteration and Lanczos / Arnoldi."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

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

__all__ = [
    "EigenBounds",
    "estimate_top_eigenvalue",
    "krylov_basis",
    "lanczos_eigen_bounds",
    "lanczos_extreme_eigenvalues",
]


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


class _Krylov:
    """An Arnoldi (= Lanczos with full reorthogonalisation) basis that can be extended.

    Holds ``V`` (rows ``[capacity, P]``), the projection ``H`` and the next basis vector, so that
    :meth:`extend` continues the same Krylov sequence (no matvec is repeated). The random
    replacement vectors for breakdowns come from ``random_rows(capacity, ...)``.
    """

    def __init__(
        self,
        op: RowOperator,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None,
        seed: int,
        capacity: int,
    ) -> None:
        self.op, self.dtype, self.capacity = op, dtype, min(capacity, dim)
        self.V = torch.zeros(self.capacity, dim, dtype=dtype, device=device)
        self.H = torch.zeros(self.capacity, self.capacity, dtype=dtype, device=device)
        self.fresh = random_rows(self.capacity, dim, dtype, device, seed)
        self.v = self.fresh[0] / torch.linalg.vector_norm(self.fresh[0]).clamp_min(tiny(dtype))
        self.m = 0

    def extend(self, m: int) -> None:
        """Run steps ``self.m .. min(m, capacity) − 1`` (see :func:`krylov_basis`)."""
        V, H, dtype = self.V, self.H, self.dtype
        breakdown_tol = 1e3 * eps(dtype)
        for j in range(self.m, min(m, self.capacity)):
            V[j] = self.v
            w = self.op(self.v[None])[0]
            w_norm0 = torch.linalg.vector_norm(w)
            Vj = V[: j + 1]
            h = Vj @ w
            w = w - h @ Vj
            h2 = Vj @ w
            w = w - h2 @ Vj
            H[: j + 1, j] = h + h2
            self.m = j + 1
            if j + 1 == self.capacity:
                break
            beta = torch.linalg.vector_norm(w)
            ok = beta > breakdown_tol * w_norm0
            # replacement direction: a fresh random vector, orthogonalised twice against V
            r = self.fresh[j + 1]
            r = r - (Vj @ r) @ Vj
            r = r - (Vj @ r) @ Vj
            r = r / torch.linalg.vector_norm(r).clamp_min(tiny(dtype))
            self.v = torch.where(ok, w / beta.clamp_min(tiny(dtype)), r)
            H[j + 1, j] = torch.where(ok, beta, torch.zeros_like(beta))

    def basis(self) -> tuple[Tensor, Tensor]:
        """``(V [m, P], T = V A Vᵀ [m, m])`` (``T`` symmetrised)."""
        T = self.H[: self.m, : self.m]
        return self.V[: self.m], 0.5 * (T + T.T)


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
    kry = _Krylov(op, dim, dtype, device, seed, steps)
    kry.extend(steps)
    return kry.basis()


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


@dataclass(frozen=True)
class EigenBounds:
    """What ``m`` Lanczos steps from a Gaussian start tell about the extreme eigenvalues of a
    symmetric ``A`` (``[P, P]``).

    With ``θ_1 ≤ … ≤ θ_m`` the Ritz values (eigenvalues of ``T = V A Vᵀ``):

    - by Cauchy interlacing, always, ``λ_min ≤ θ_1`` and ``θ_m ≤ λ_max``;
    - by the Kuczyński–Woźniakowski bound (SIAM J. Matrix Anal. Appl. 13(4), 1992: for a
      positive semi-definite ``B``, ``Pr[θ_max(B) < (1 − ε) λ_max(B)] ≤ 1.648 √P e^{−√ε (2m−1)}``)
      applied to ``A − λ_min I`` and ``λ_max I − A`` (the Krylov space is shift-invariant), with
      probability at least ``1 − 2η`` over the start vector both ``θ_1 − λ_min`` and ``λ_max −
      θ_m`` are at most ``ε S``, ``S = λ_max − λ_min ≤ (θ_m − θ_1)/(1 − 2ε)``, where
      ``√ε = ln(1.648 √P / η) / (2m − 1)``. Hence ``lambda_min_lower = θ_1 − ε(θ_m − θ_1)/(1 −
      2ε)`` and ``lambda_max_upper = θ_m + ε(θ_m − θ_1)/(1 − 2ε)`` (infinite while ``ε ≥ ½``).

    The residual ``‖A y_1 − θ_1 y_1‖`` of the smallest Ritz pair is *not* a bound on ``λ_min``: it
    bounds the distance to *some* eigenvalue, and a Ritz value that has not resolved the
    smallest one sits near a larger one with a small residual (seen on a log-spaced spectrum,
    ``P = 60``, ``κ = 100``, 20 steps). The bound above holds whatever the spectrum, at the
    price of being pessimistic: it certifies ``κ ≤ 10³`` for a ``κ = 10²`` operator of size 100
    after about 80 steps. When ``m = P`` the Ritz values are the eigenvalues (``exact``).

    Attributes:
        lambda_min, lambda_max: ``θ_1`` (an upper bound on ``λ_min``), ``θ_m`` (a lower bound on
            ``λ_max``).
        steps: ``m``, the Lanczos steps (products of ``A``) used.
        exact: ``m == P``.
        eps: ``ε`` above (0 when exact).
        failure_probability: ``η`` (per bound).
    """

    lambda_min: float
    lambda_max: float
    steps: int
    exact: bool
    eps: float = 0.0
    failure_probability: float = 0.0

    def _slack(self) -> float:
        if self.exact:
            return 0.0
        if self.eps >= 0.5:
            return math.inf
        return self.eps * (self.lambda_max - self.lambda_min) / (1.0 - 2.0 * self.eps)

    @property
    def lambda_min_lower(self) -> float:
        """A lower bound on ``λ_min`` (with probability ``≥ 1 − η``; exact when ``exact``)."""
        return self.lambda_min - self._slack()

    @property
    def lambda_max_upper(self) -> float:
        """An upper bound on ``λ_max`` (with probability ``≥ 1 − η``; exact when ``exact``)."""
        return self.lambda_max + self._slack()

    def condition_bounds(self) -> tuple[float, float]:
        """``(κ_lo, κ_hi)`` with ``κ_lo ≤ κ = λ_max/λ_min ≤ κ_hi`` for a positive definite
        ``A``: ``κ_lo = θ_m/θ_1`` (interlacing; ``inf`` when ``θ_1 ≤ 0``: ``A`` is not positive
        definite) and ``κ_hi = lambda_max_upper / lambda_min_lower`` (``inf`` when the lower
        bound is ``≤ 0``: positive definiteness not certified)."""
        lo = self.lambda_max / self.lambda_min if self.lambda_min > 0 else math.inf
        low = self.lambda_min_lower
        hi = self.lambda_max_upper / low if low > 0 else math.inf
        return lo, max(hi, lo)

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "lambda_min_lower": self.lambda_min_lower,
            "lambda_max_upper": self.lambda_max_upper,
        }


def lanczos_eigen_bounds(
    matvec: Matvec,
    dim: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    steps: int = 20,
    seed: int = 0,
    batched: bool = False,
    max_steps: int | None = None,
    decided: Callable[[EigenBounds], bool] | None = None,
    failure_probability: float = 1e-3,
) -> EigenBounds:
    """Extreme-eigenvalue bounds of a symmetric ``A`` ``[P, P]`` by Lanczos (:class:`EigenBounds`).

    Runs ``m = min(steps, P)`` Lanczos steps with full reorthogonalisation (:func:`krylov_basis`)
    and returns the Ritz values with the bounds they imply. While ``decided(bounds)`` is false
    (default: never extend) the *same* Krylov sequence is continued to ``2m, 4m, …`` steps, at
    most ``max_steps`` (default ``steps``) or ``P``: the smallest Ritz value of an
    ill-conditioned operator needs many steps, and the bounds say when it may not have converged.

    Args:
        matvec: ``[P] -> [P]`` (or ``[k, P] -> [k, P]`` with ``batched=True``).
        dim: ``P``; dtype, device: of the Lanczos vectors; seed: of the start vector.
        steps: the first batch of steps (``>= 1``).
        max_steps: the most steps when extending (``>= steps``).
        decided: ``bounds -> bool``; ``True`` stops the extension.
        failure_probability: ``η`` in ``(0, 1)``, the chance (over the start vector) that each
            probabilistic bound fails.

    Cost: ``m`` products of ``A`` (one row each); no host synchronisation inside a batch of steps.
    """
    check_positive_int(dim, "dim")
    check_positive_int(steps, "steps")
    max_steps = steps if max_steps is None else check_positive_int(max_steps, "max_steps")
    if max_steps < steps:
        raise ValueError(f"max_steps={max_steps}: expected >= steps={steps}")
    if not 0.0 < float(failure_probability) < 1.0:
        raise ValueError(f"failure_probability={failure_probability!r}: expected in (0, 1)")
    check_dtype(dtype)
    device = check_device(device)
    op = RowOperator(matvec, one_d=not batched)
    kry = _Krylov(op, dim, dtype, device, seed, max_steps)
    m = min(steps, kry.capacity)
    while True:
        kry.extend(m)
        theta = torch.linalg.eigvalsh(kry.basis()[1])
        exact = m == dim
        root = math.log(1.648 * math.sqrt(dim) / float(failure_probability)) / (2 * m - 1)
        bounds = EigenBounds(
            lambda_min=float(theta[0]),
            lambda_max=float(theta[-1]),
            steps=m,
            exact=exact,
            eps=0.0 if exact else root * root,
            failure_probability=float(failure_probability),
        )
        if m >= kry.capacity or decided is None or decided(bounds):
            return bounds
        m = min(2 * m, kry.capacity)
