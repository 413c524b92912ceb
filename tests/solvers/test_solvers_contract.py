"""The shared SolveResult / matvec contract across every total solver, and the registry."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metafluence.solvers import SOLVERS, SolveResult, get_solver
from tests._close import assert_close_normwise

from ._helpers import dense_solve, randn, spd

OPTIONS: dict[str, dict[str, Any]] = {
    "cg": {"rtol": 1e-10, "maxiter": 300},
    "neumann": {"rtol": 1e-11, "maxiter": 3000},
    "direct": {},
    "arnoldi": {"rank": 10_000},  # rank >= P: exact
}
OPTIONS32: dict[str, dict[str, Any]] = {
    "cg": {"rtol": 1e-5, "maxiter": 300},
    "neumann": {"rtol": 1e-5, "maxiter": 2000},
    "direct": {},
    "arnoldi": {"rank": 10_000},
}


def _checked_matvec(A: torch.Tensor, rank: int, seen: list[int]):
    def mv(x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == rank, f"matvec got {x.dim()}-D input for a {rank}-D b"
        assert x.shape[-1] == A.shape[0]
        seen.append(x.shape[0] if rank == 2 else 1)
        return x @ A.T

    return mv


def test_registry() -> None:
    assert set(SOLVERS) == {"cg", "neumann", "direct", "arnoldi"}
    for name in SOLVERS:
        assert get_solver(name) is SOLVERS[name]
    assert get_solver("CG") is SOLVERS["cg"]
    with pytest.raises(ValueError, match="'cg', 'neumann', 'direct', 'arnoldi'"):
        get_solver("lissa")


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("shape", ["P", "1P", "kP", "P=1"])
def test_shapes_and_damping(name: str, shape: str) -> None:
    P = 1 if shape == "P=1" else 24
    A, _, _ = spd(P, 50.0, seed=120) if P > 1 else (torch.tensor([[2.0]]).double(), None, None)
    if shape in ("P", "P=1"):
        b = randn(P, seed=121)
    elif shape == "1P":
        b = randn(1, P, seed=121)
    else:
        b = randn(3, P, seed=121)
    seen: list[int] = []
    damping = 0.25
    r = get_solver(name)(_checked_matvec(A, b.dim(), seen), b, damping=damping, **OPTIONS[name])
    assert isinstance(r, SolveResult)
    assert r.x.shape == b.shape and r.x.dtype == b.dtype
    assert r.residual.shape == b.shape[:-1]
    assert r.column_converged is not None and r.column_converged.shape == b.shape[:-1]
    assert r.converged, (name, shape, r.residual)
    torch.testing.assert_close(r.x, dense_solve(A, b, damping), rtol=1e-7, atol=1e-9)
    true = torch.linalg.vector_norm(b - r.x @ A.T - damping * r.x, dim=-1)
    true = true / torch.linalg.vector_norm(b, dim=-1)
    torch.testing.assert_close(r.residual, true, rtol=1e-3, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_noncontiguous_rhs(name: str) -> None:
    P = 20
    A, _, _ = spd(P, 20.0, seed=122)
    big = randn(P, 6, seed=123)
    b = big[:, ::2].T  # [3, P], non-contiguous
    assert not b.is_contiguous()
    r = get_solver(name)(lambda x: x @ A.T, b, **OPTIONS[name])
    assert r.converged
    torch.testing.assert_close(r.x, dense_solve(A, b.contiguous()), rtol=1e-7, atol=1e-9)
    b1 = big[:, 1]  # [P], stride 6
    r = get_solver(name)(lambda x: A @ x, b1, **OPTIONS[name])
    torch.testing.assert_close(r.x, dense_solve(A, b1.contiguous()), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_float32(name: str) -> None:
    P = 20
    A, _, _ = spd(P, 20.0, seed=124, dtype=torch.float32)
    b = randn(2, P, seed=125, dtype=torch.float32)
    r = get_solver(name)(lambda x: x @ A.T, b, damping=0.1, **OPTIONS32[name])
    assert r.x.dtype == torch.float32 and r.residual.dtype == torch.float32
    ref = dense_solve(A.double(), b.double(), 0.1)
    assert_close_normwise(r.x, ref, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_zero_rhs_column(name: str) -> None:
    P = 15
    A, _, _ = spd(P, 10.0, seed=126)
    b = torch.stack([torch.zeros(P, dtype=torch.float64), randn(P, seed=127)])
    r = get_solver(name)(lambda x: x @ A.T, b, **OPTIONS[name])
    assert torch.equal(r.x[0], torch.zeros(P, dtype=torch.float64))
    assert float(r.residual[0]) == 0.0
    assert r.column_converged is not None and bool(r.column_converged[0])
