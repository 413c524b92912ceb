"""Neumann / LiSSA: never diverges with the automatic scale, honest convergence flags."""

from __future__ import annotations

import pytest
import torch

from metafluence.solvers import estimate_top_eigenvalue, solve_neumann
from tests._close import rel_err

from ._helpers import dense_solve, randn, row_matvec, spd


def _true_rel_residual(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(b - x @ A.T, dim=-1) / torch.linalg.vector_norm(b, dim=-1)


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("lam_max", [1.0, 250.0])
def test_neumann_auto_scale_never_diverges(cond: float, lam_max: float) -> None:
    P = 50
    A, _, _ = spd(P, cond, seed=30, lam_max=lam_max)
    b = randn(3, P, seed=31)
    r = solve_neumann(row_matvec(A), b, maxiter=200, rtol=1e-12)
    assert torch.isfinite(r.x).all()
    assert (r.residual <= 1.0).all()  # initial residual (x = 0) is 1
    assert r.info["scale"] > lam_max / 2
    torch.testing.assert_close(r.residual, _true_rel_residual(A, b, r.x))
    if cond >= 1e4:
        assert not r.converged  # slow on ill-conditioned systems, and says so
        assert r.iters == 200


def test_neumann_converges_well_conditioned() -> None:
    P = 50
    A, _, _ = spd(P, 1e2, seed=32)
    b = randn(P, seed=33)
    r = solve_neumann(row_matvec(A), b, maxiter=4000, rtol=1e-8)
    assert r.converged and r.residual.shape == ()
    assert rel_err(r.x, dense_solve(A, b)) <= 1e-6
    assert r.iters < 4000
    assert float(r.residual) <= 1e-8


def test_neumann_recovers_from_underestimated_scale() -> None:
    # one outlier eigenvalue: a 1-step power iteration (Rayleigh quotient of a random vector)
    # badly underestimates λ_max, so the first scale makes the series diverge
    P = 40
    Q, _ = torch.linalg.qr(randn(P, P, seed=34))
    eigs = torch.cat([torch.tensor([20.0]), torch.linspace(1.0, 2.0, P - 1)]).double()
    A = (Q * eigs) @ Q.T
    b = randn(2, P, seed=35)
    r = solve_neumann(row_matvec(A), b, maxiter=3000, rtol=1e-6, power_iters=1)
    assert r.info["initial_scale"] < 10.0
    assert r.info["scale_increases"] >= 1
    assert r.info["scale"] > 10.0
    assert r.converged
    torch.testing.assert_close(r.x, dense_solve(A, b), rtol=1e-4, atol=1e-6)


def test_neumann_user_scale_too_small_warns_and_returns_best() -> None:
    P = 30
    A, _, _ = spd(P, 10.0, seed=36)
    b = randn(P, seed=37)
    with pytest.warns(RuntimeWarning, match="diverges"):
        r = solve_neumann(row_matvec(A), b, scale=0.2, maxiter=500)
    assert not r.converged
    assert float(r.residual) <= 1.0
    assert r.info["scale"] == 0.2
    torch.testing.assert_close(r.residual, _true_rel_residual(A, b, r.x))


def test_neumann_user_scale_and_damping() -> None:
    P, rank = 30, 4
    U = randn(P, rank, seed=38)
    A = U @ U.T / P
    lam_max = float(torch.linalg.eigvalsh(A)[-1])
    b = randn(2, P, seed=39)
    damping = 0.5
    r = solve_neumann(
        row_matvec(A), b, damping=damping, scale=lam_max + damping, maxiter=2000, rtol=1e-10
    )
    assert r.converged and r.info["scale"] == lam_max + damping
    torch.testing.assert_close(r.x, dense_solve(A, b, damping), rtol=1e-8, atol=1e-9)


def test_neumann_per_column_and_check_every() -> None:
    P = 30
    A, _Q, _eigs = spd(P, 1e2, seed=40)
    b = torch.stack([torch.zeros(P, dtype=A.dtype), randn(P, seed=41)])
    r = solve_neumann(row_matvec(A), b, maxiter=50, rtol=1e-6, check_every=1000)
    assert not r.converged
    assert r.column_converged is not None
    assert bool(r.column_converged[0]) and not bool(r.column_converged[1])
    assert torch.equal(r.x[0], torch.zeros(P, dtype=A.dtype))
    assert r.iters == 50
    assert int(r.info["column_iters"][0]) == 0


def test_neumann_float32() -> None:
    P = 30
    A, _, _ = spd(P, 10.0, seed=42, dtype=torch.float32)
    b = randn(P, seed=43, dtype=torch.float32)
    r = solve_neumann(row_matvec(A), b, maxiter=1000, rtol=1e-5)
    assert r.converged and r.x.dtype == torch.float32
    assert rel_err(r.x.double(), dense_solve(A.double(), b.double())) < 1e-3


def test_estimate_top_eigenvalue() -> None:
    P = 60
    A, _, _eigs = spd(P, 1e3, seed=44, lam_max=7.0)
    lam = estimate_top_eigenvalue(lambda v: A @ v, P, torch.float64, "cpu", iters=50, seed=1)
    assert lam <= 7.0 * (1 + 1e-12)
    assert lam >= 0.97 * 7.0
    lam_b = estimate_top_eigenvalue(lambda v: v @ A, P, torch.float64, None, 50, 1, batched=True)
    assert lam_b == pytest.approx(lam, rel=1e-12)
    with pytest.raises(ValueError, match="iters"):
        estimate_top_eigenvalue(lambda v: A @ v, P, iters=0)


def test_neumann_shrink_false_calls_matvec_on_all_rows() -> None:
    P = 30
    A, _, _ = spd(P, 20.0, seed=45)
    b = torch.stack([randn(P, seed=46), torch.zeros(P, dtype=A.dtype), 1e-3 * randn(P, seed=47)])

    def mv(x: torch.Tensor) -> torch.Tensor:
        assert x.shape == (3, P), "shrink=False must always pass every row"
        return x @ A

    r = solve_neumann(mv, b, maxiter=2000, rtol=1e-9, shrink=False)
    assert r.converged
    torch.testing.assert_close(r.x, dense_solve(A, b), rtol=1e-7, atol=1e-12)
    assert torch.equal(r.x[1], torch.zeros(P, dtype=A.dtype))
