"""Conjugate gradients: accuracy, honest convergence flags, per-column early exit, curvature."""

from __future__ import annotations

import warnings

import pytest
import torch

from metafluence.solvers import solve_cg
from tests._close import rel_err

from ._helpers import dense_solve, randn, row_matvec, spd


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
def test_cg_matches_dense_solve(cond: float) -> None:
    P = 50
    A, _, _ = spd(P, cond, seed=1)
    b = randn(3, P, seed=2)
    rtol = 1e-10
    r = solve_cg(row_matvec(A), b, rtol=rtol, maxiter=10 * P)
    ref = dense_solve(A, b)
    if r.converged:
        assert (r.residual <= rtol).all()
        for j in range(3):
            assert rel_err(r.x[j], ref[j]) <= 1e-6
    else:  # honest: an unconverged column really is above the tolerance
        assert (r.residual > rtol).any()
    if cond <= 1e4:
        assert r.converged
    assert r.column_converged is not None and r.column_converged.shape == (3,)
    assert r.residual.shape == (3,)
    # reported residual is the true one
    true = torch.linalg.vector_norm(b - r.x @ A.T, dim=1) / torch.linalg.vector_norm(b, dim=1)
    torch.testing.assert_close(r.residual, true, rtol=1e-6, atol=1e-11)


def test_cg_larger_well_conditioned() -> None:
    P = 200
    A, _, _ = spd(P, 1e2, seed=3)
    b = randn(P, seed=4)
    r = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=3 * P)
    assert r.converged and not r.negative_curvature
    assert rel_err(r.x, dense_solve(A, b)) <= 1e-8
    assert r.residual.shape == ()


def test_cg_unconverged_is_reported() -> None:
    P = 50
    A, _, _ = spd(P, 1e6, seed=1)
    b = randn(2, P, seed=2)
    r = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=20)
    assert not r.converged
    assert r.iters == 20
    assert r.column_converged is not None and not r.column_converged.any()
    true = torch.linalg.vector_norm(b - r.x @ A.T, dim=1) / torch.linalg.vector_norm(b, dim=1)
    torch.testing.assert_close(r.residual, true)
    assert (r.residual > 1e-10).all()


def test_cg_per_column_early_exit() -> None:
    P = 60
    A, Q, eigs = spd(P, 1e3, seed=5)
    q = Q[:, 7]
    b = torch.stack([randn(P, seed=6), torch.zeros(P, dtype=A.dtype), q, randn(P, seed=7)])
    rows: list[int] = []

    def mv(x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 2
        rows.append(x.shape[0])
        return x @ A

    r = solve_cg(mv, b, rtol=1e-9, maxiter=10 * P, check_every=5)
    assert r.converged and r.column_converged is not None and bool(r.column_converged.all())
    it = r.info["column_iters"]
    assert int(it[1]) == 0 and int(it[2]) == 1
    assert int(it[0]) > 10 and int(it[3]) > 10
    assert torch.equal(r.x[1], torch.zeros(P, dtype=A.dtype))
    torch.testing.assert_close(r.x[2], q / eigs[7], rtol=1e-12, atol=1e-12)
    # the eigenvector column is frozen after its first step: same bits as a 1-step solve
    alone = solve_cg(lambda x: x @ A, q[None], rtol=1e-9, maxiter=1)
    assert torch.equal(r.x[2], alone.x[0])
    # the zero column never reaches matvec; the active set shrinks at check points
    assert rows[0] == 3
    assert rows[-1] < 3
    ref = dense_solve(A, b)
    for j in (0, 3):
        assert rel_err(r.x[j], ref[j]) <= 1e-6


def test_cg_negative_curvature_detected() -> None:
    P = 40
    Q, _ = torch.linalg.qr(randn(P, P, seed=8))
    eigs = torch.cat([torch.linspace(1.0, 3.0, P // 2), -torch.linspace(0.5, 2.0, P // 2)])
    eigs = eigs.to(torch.float64)
    A = (Q * eigs) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.stack([randn(P, seed=9), Q[:, 0], randn(P, seed=10)])
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        r = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=200)
    assert r.negative_curvature
    assert not r.converged
    cols = r.info["negative_curvature_columns"]
    assert 0 in cols and 2 in cols and 1 not in cols
    assert r.column_converged is not None and bool(r.column_converged[1])
    assert torch.isfinite(r.x).all() and torch.isfinite(r.residual).all()
    true = torch.linalg.vector_norm(b - r.x @ A.T, dim=1) / torch.linalg.vector_norm(b, dim=1)
    torch.testing.assert_close(r.residual, true)


def test_cg_negative_definite_1d_warns() -> None:
    P = 10
    A, _, _ = spd(P, 10.0, seed=11)
    with pytest.warns(RuntimeWarning):
        r = solve_cg(row_matvec(-A), randn(P, seed=12))
    assert r.negative_curvature and not r.converged
    assert r.info["negative_curvature_columns"] == [0]
    assert torch.equal(r.x, torch.zeros(P, dtype=A.dtype))  # stopped before any step


def test_cg_damping_on_singular_psd() -> None:
    P, rank = 30, 5
    U = randn(P, rank, seed=13)
    A = U @ U.T
    b = randn(2, P, seed=14)
    r = solve_cg(row_matvec(A), b, damping=0.1, rtol=1e-12, maxiter=200)
    assert r.converged
    torch.testing.assert_close(r.x, dense_solve(A, b, 0.1), rtol=1e-9, atol=1e-10)


def test_cg_x0_and_atol() -> None:
    P = 30
    A, _, _ = spd(P, 1e2, seed=15)
    b = randn(P, seed=16)
    exact = dense_solve(A, b)
    r = solve_cg(row_matvec(A), b, x0=exact, rtol=1e-8)
    assert r.converged and r.iters == 0
    r = solve_cg(row_matvec(A), b, x0=randn(P, seed=17), rtol=1e-12, maxiter=200)
    assert r.converged and rel_err(r.x, exact) < 1e-9
    r = solve_cg(row_matvec(A), b, rtol=0.0, atol=1e30)
    assert r.converged and r.iters == 0
    with pytest.raises(ValueError, match="x0"):
        solve_cg(row_matvec(A), b, x0=torch.zeros(P + 1, dtype=A.dtype))


def test_cg_check_every_larger_than_maxiter() -> None:
    P = 30
    A, _, _ = spd(P, 1e2, seed=18)
    b = randn(2, P, seed=19)
    r = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=150, check_every=1000)
    assert r.converged
    torch.testing.assert_close(r.x, dense_solve(A, b), rtol=1e-8, atol=0.0)
    r = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=3, check_every=1000)
    assert not r.converged and r.iters == 3


def test_cg_jacobi_preconditioner() -> None:
    P = 40
    A, _, _ = spd(P, 10.0, seed=20)
    d = torch.logspace(0, 3, P, dtype=torch.float64)
    A = d[:, None] * A * d[None, :]  # badly scaled
    b = randn(P, seed=21)
    diag = torch.diagonal(A)
    plain = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=2000)
    pre = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=2000, precond=lambda r: r / diag)
    assert pre.converged
    assert pre.iters < plain.iters
    assert rel_err(pre.x, dense_solve(A, b)) < 1e-6


def test_cg_empty_and_all_zero() -> None:
    A, _, _ = spd(5, 10.0, seed=22)
    r = solve_cg(row_matvec(A), torch.zeros(0, 5, dtype=torch.float64))
    assert r.x.shape == (0, 5) and r.converged and r.iters == 0
    r = solve_cg(row_matvec(A), torch.zeros(3, 5, dtype=torch.float64))
    assert r.converged and torch.equal(r.x, torch.zeros(3, 5, dtype=torch.float64))
    assert torch.equal(r.residual, torch.zeros(3, dtype=torch.float64))


def test_cg_bad_arguments() -> None:
    A, _, _ = spd(5, 10.0, seed=23)
    b = randn(5, seed=24)
    with pytest.raises(ValueError, match="b has 3 dims"):
        solve_cg(row_matvec(A), b.reshape(1, 1, 5))
    with pytest.raises(ValueError, match="damping"):
        solve_cg(row_matvec(A), b, damping=-1.0)
    with pytest.raises(ValueError, match="check_every"):
        solve_cg(row_matvec(A), b, check_every=0)
    with pytest.raises(ValueError, match="matvec returned shape"):
        solve_cg(lambda x: x[:-1], b)


def test_cg_float32() -> None:
    P = 40
    A, _, _ = spd(P, 1e2, seed=25, dtype=torch.float32)
    b = randn(2, P, seed=26, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = solve_cg(row_matvec(A), b, rtol=1e-5, maxiter=200)
    assert r.converged and r.x.dtype == torch.float32
    ref = dense_solve(A.double(), b.double())
    assert rel_err(r.x.double(), ref) < 1e-3


def test_cg_shrink_false_calls_matvec_on_all_rows() -> None:
    P = 40
    A, Q, eigs = spd(P, 1e3, seed=27)
    b = torch.stack([randn(P, seed=28), torch.zeros(P, dtype=A.dtype), Q[:, 3]])

    def mv(x: torch.Tensor) -> torch.Tensor:
        assert x.shape == (3, P), "shrink=False must always pass every row"
        return x @ A

    r = solve_cg(mv, b, rtol=1e-10, maxiter=10 * P, shrink=False)
    ref = solve_cg(row_matvec(A), b, rtol=1e-10, maxiter=10 * P)
    assert r.converged and ref.converged
    torch.testing.assert_close(r.x, ref.x, rtol=1e-6, atol=1e-9)  # rounding differs
    assert torch.equal(r.x[1], torch.zeros(P, dtype=A.dtype))
    torch.testing.assert_close(r.x[2], Q[:, 3] / eigs[3], rtol=1e-12, atol=1e-12)
    assert int(r.info["column_iters"][2]) == 1


@pytest.mark.parametrize("precond", [False, True])
def test_cg_recurrence_residual_saves_a_product(precond: bool) -> None:
    """``true_residual=False``: the same iterates, the recurrence's ``‖r‖`` (= the true residual
    to rounding, float64) and one ``matvec`` call fewer; columns that stop on negative
    curvature report theirs too."""
    P = 60
    A, _, eigs = spd(P, 1e3, seed=11)
    b = randn(3, P, seed=12)
    pc = (lambda R: R / torch.diagonal(A)) if precond else None
    kw = dict(rtol=1e-12, maxiter=4, precond=pc)
    honest = solve_cg(row_matvec(A), b, **kw)
    cheap = solve_cg(row_matvec(A), b, true_residual=False, **kw)
    assert torch.equal(cheap.x, honest.x)
    torch.testing.assert_close(cheap.residual, honest.residual, rtol=1e-8, atol=0)
    assert cheap.info["matvec_calls"] == honest.info["matvec_calls"] - 1
    assert (cheap.info["residual"], honest.info["residual"]) == ("recurrence", "true")
    Q, _ = torch.linalg.qr(randn(P, P, seed=8))
    ev = torch.cat([torch.linspace(1.0, 3.0, P // 2), -torch.linspace(0.5, 2.0, P // 2)])
    B = (Q * ev.double()) @ Q.T
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        neg = solve_cg(row_matvec(0.5 * (B + B.T)), b, rtol=1e-10, maxiter=40, true_residual=False)
    true = torch.linalg.vector_norm(b - neg.x @ B.T, dim=1) / torch.linalg.vector_norm(b, dim=1)
    torch.testing.assert_close(neg.residual, true, rtol=1e-6, atol=0)
