"""Dense solve, Arnoldi top-eigenspace solve and Lanczos extreme eigenvalues."""

from __future__ import annotations

import pytest
import torch

from metafluence.solvers import (
    dense_matrix,
    lanczos_extreme_eigenvalues,
    solve_arnoldi,
    solve_direct,
)
from tests._close import rel_err

from ._helpers import dense_solve, randn, row_matvec, spd

# ----------------------------------------------------------------------------- direct


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_direct_exact(cond: float) -> None:
    P = 80
    A, _, _ = spd(P, cond, seed=50)
    x_true = randn(2, P, seed=51)
    b = x_true @ A.T
    r = solve_direct(row_matvec(A), b)
    assert r.converged and r.info["method"] == "cholesky" and r.iters == 0
    tol = 1e-10 if cond <= 1e4 else 1e-8  # forward error <= cond · eps
    assert rel_err(r.x, x_true) <= tol
    assert rel_err(r.x, dense_solve(A, b)) <= tol
    assert (r.residual <= 1e-12).all()


def test_direct_1d_damping_and_indefinite() -> None:
    P = 25
    A, _Q, _ = spd(P, 1e3, seed=52)
    b = randn(P, seed=53)
    calls: list[int] = []

    def mv(v: torch.Tensor) -> torch.Tensor:
        assert v.shape == (P,)
        calls.append(1)
        return A @ v

    r = solve_direct(mv, b, damping=0.3)
    assert len(calls) == P and r.residual.shape == ()
    assert rel_err(r.x, dense_solve(A, b, 0.3)) <= 1e-12
    S = A - 0.5 * torch.eye(P, dtype=A.dtype)  # indefinite: Cholesky fails, eigh is used
    r = solve_direct(row_matvec(S), b)
    assert r.info["method"] == "eigh" and r.converged
    assert rel_err(r.x, dense_solve(S, b)) <= 1e-10


def test_direct_singular_min_norm() -> None:
    P, rank = 20, 6
    U = randn(P, rank, seed=54)
    A = U @ U.T
    b = randn(rank, seed=55) @ U.T  # consistent: b in range(A)
    r = solve_direct(row_matvec(A), b[None])
    assert r.info["method"] == "eigh_pinv"
    assert r.converged
    torch.testing.assert_close(r.x[0], torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)


def test_direct_limits_and_dense_matrix() -> None:
    A, _, _ = spd(12, 10.0, seed=56)
    with pytest.raises(ValueError, match="max_dim"):
        solve_direct(row_matvec(A), randn(12, seed=57), max_dim=10)
    with pytest.raises(ValueError, match="dim=11"):
        solve_direct(row_matvec(A), randn(12, seed=57), dim=11)
    N = randn(12, 12, seed=58)  # non-symmetric: dense_matrix returns it unchanged
    M = dense_matrix(lambda x: x @ N.T, 12, torch.float64, chunk=5)
    torch.testing.assert_close(M, N, rtol=0, atol=0)
    M1 = dense_matrix(lambda v: N @ v, 12, torch.float64, batched=False)
    torch.testing.assert_close(M1, N, rtol=0, atol=0)


# ---------------------------------------------------------------------------- arnoldi


@pytest.mark.parametrize("cond", [1e2, 1e4])
def test_arnoldi_exact_full_rank(cond: float) -> None:
    P = 50
    A, _, eigs = spd(P, cond, seed=60)
    b = randn(2, P, seed=61)
    r = solve_arnoldi(row_matvec(A), b, rank=P)
    assert r.converged and r.iters == P
    assert rel_err(r.x, dense_solve(A, b)) <= 1e-8
    ev = r.info["eigenvalues"]
    torch.testing.assert_close(torch.sort(ev).values, torch.sort(eigs).values, rtol=1e-8, atol=0)


def test_arnoldi_repeated_eigenvalues() -> None:
    # A = 2 I: the Krylov space of any vector is 1-D; restarts must still span everything
    P = 10
    A = 2.0 * torch.eye(P, dtype=torch.float64)
    b = randn(P, seed=62)
    r = solve_arnoldi(lambda v: A @ v, b, rank=P)
    assert r.converged
    torch.testing.assert_close(r.x, b / 2.0)


def test_arnoldi_low_rank_and_damping() -> None:
    P, rank = 40, 5
    U = randn(P, rank, seed=63)
    A = U @ U.T
    b = randn(3, rank, seed=64) @ U.T  # in range(A)
    r = solve_arnoldi(row_matvec(A), b, damping=0.1, rank=rank, iters=15)
    assert r.converged
    torch.testing.assert_close(r.x, dense_solve(A, b, 0.1), rtol=1e-8, atol=1e-10)
    top = torch.linalg.eigvalsh(A)[-rank:]
    torch.testing.assert_close(torch.sort(r.info["eigenvalues"]).values, top, rtol=1e-9, atol=0)


def test_arnoldi_truncated_is_honest() -> None:
    P = 40
    A, _, _ = spd(P, 1e3, seed=65)
    b = randn(P, seed=66)
    r = solve_arnoldi(row_matvec(A), b, rank=5)
    assert not r.converged and r.iters == 20
    true = torch.linalg.vector_norm(b - A @ r.x) / torch.linalg.vector_norm(b)
    torch.testing.assert_close(r.residual, true)
    assert r.info["eigenvalues"].shape == (5,)
    with pytest.raises(ValueError, match="iters"):
        solve_arnoldi(row_matvec(A), b, rank=10, iters=5)


# ---------------------------------------------------------------------------- lanczos


@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_lanczos_exact_with_full_steps(cond: float) -> None:
    P = 60
    A, _, _ = spd(P, cond, seed=70, lam_max=3.0)
    ev = torch.linalg.eigvalsh(A)
    lo, hi = lanczos_extreme_eigenvalues(lambda v: A @ v, P, torch.float64, steps=P)
    assert lo == pytest.approx(float(ev[0]), rel=1e-8)
    assert hi == pytest.approx(float(ev[-1]), rel=1e-12)


def test_lanczos_few_steps_top_close_and_bounds() -> None:
    P = 100
    A, _, _ = spd(P, 1e4, seed=71, lam_max=5.0)
    ev = torch.linalg.eigvalsh(A)
    lo, hi = lanczos_extreme_eigenvalues(lambda v: A @ v, P, steps=20)
    assert hi == pytest.approx(float(ev[-1]), rel=1e-6)
    assert hi <= float(ev[-1]) * (1 + 1e-12)
    assert lo >= float(ev[0]) * (1 - 1e-12)  # interlacing: Ritz values lie inside


def test_lanczos_indefinite_and_repeated() -> None:
    P = 30
    Q, _ = torch.linalg.qr(randn(P, P, seed=72))
    eigs = torch.cat([torch.full((10,), -2.0), torch.full((10,), 1.0), torch.full((10,), 4.0)])
    A = (Q * eigs.double()) @ Q.T
    lo, hi = lanczos_extreme_eigenvalues(lambda x: x @ A, P, steps=P, batched=True)
    assert lo == pytest.approx(-2.0, rel=1e-10)
    assert hi == pytest.approx(4.0, rel=1e-10)
    lo32, hi32 = lanczos_extreme_eigenvalues(
        lambda v: v @ A.float(), P, torch.float32, steps=P, seed=3
    )
    assert lo32 == pytest.approx(-2.0, rel=1e-4) and hi32 == pytest.approx(4.0, rel=1e-4)
