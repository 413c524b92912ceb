"""Linear solvers for inverse-Hessian-vector products (``ihvp``).

All total solves share one contract: ``solve_*(matvec, b, damping=0.0, ...) -> SolveResult``
solving ``(A + damping I) x = b`` for a symmetric operator ``A`` given by ``matvec``, with ``b``
``[P]`` or ``[k, P]`` (right-hand sides as rows; ``matvec`` receives tensors of the same rank as
``b``). See :mod:`metafluence.solvers._base` and ``math.md`` §4.

Total solves (``get_solver``): ``cg``, ``neumann``, ``direct``, ``arnoldi``.
Inner (structured) solves: ``solve_woodbury`` / ``solve_woodbury_batched`` (``γI + UUᵀ``; factored
once with ``woodbury_factor``, applied with ``woodbury_apply``),
``solve_ekfac`` (Kronecker-factored curvature of linear layers).
Nonlinear: ``damped_newton`` (Newton steps with backtracking on ``‖∇‖``, a pluggable linear solve).
"""

from __future__ import annotations

from collections.abc import Callable

from ._base import Matvec, SolveResult
from .arnoldi import solve_arnoldi
from .cg import solve_cg
from .direct import dense_matrix, solve_direct
from .eigen import (
    EigenBounds,
    estimate_top_eigenvalue,
    lanczos_eigen_bounds,
    lanczos_extreme_eigenvalues,
)
from .ekfac import (
    KFACFactors,
    KFACLayerFactors,
    compute_kfac_factors,
    compute_kfac_factors_batched,
    ekfac_matvec,
    solve_ekfac,
)
from .neumann import solve_neumann
from .newton import NewtonResult, damped_newton
from .woodbury import (
    WoodburyFactor,
    solve_woodbury,
    solve_woodbury_batched,
    woodbury_apply,
    woodbury_factor,
)

__all__ = [
    "SOLVERS",
    "EigenBounds",
    "KFACFactors",
    "KFACLayerFactors",
    "Matvec",
    "NewtonResult",
    "SolveResult",
    "WoodburyFactor",
    "compute_kfac_factors",
    "compute_kfac_factors_batched",
    "damped_newton",
    "dense_matrix",
    "ekfac_matvec",
    "estimate_top_eigenvalue",
    "get_solver",
    "lanczos_eigen_bounds",
    "lanczos_extreme_eigenvalues",
    "solve_arnoldi",
    "solve_cg",
    "solve_direct",
    "solve_ekfac",
    "solve_neumann",
    "solve_woodbury",
    "solve_woodbury_batched",
    "woodbury_apply",
    "woodbury_factor",
]

SOLVERS: dict[str, Callable[..., SolveResult]] = {
    "cg": solve_cg,
    "neumann": solve_neumann,
    "direct": solve_direct,
    "arnoldi": solve_arnoldi,
}
"""Total-Hessian solvers by name: each is ``f(matvec, b, damping=0.0, **options)``."""


def get_solver(name: str) -> Callable[..., SolveResult]:
    """Return the total solver called ``name`` (``"cg"``, ``"neumann"``, ``"direct"``,
    ``"arnoldi"``); ``ValueError`` listing the valid names otherwise."""
    key = name.lower() if isinstance(name, str) else name
    try:
        return SOLVERS[key]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in SOLVERS)
        raise ValueError(f"unknown solver {name!r}; expected one of {valid}") from None
