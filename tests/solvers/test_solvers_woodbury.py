"""Woodbury solve of (γI + U W Uᵀ) x = v, single and batched over tasks."""

from __future__ import annotations

import pytest
import torch

from metafluence.solvers import solve_woodbury, solve_woodbury_batched
from tests._close import assert_close_normwise

from ._helpers import randn


def _dense(U: torch.Tensor, v: torch.Tensor, gamma: float, W: torch.Tensor | None = None):
    P = U.shape[0]
    Wm = (
        torch.eye(U.shape[1], dtype=U.dtype)
        if W is None
        else (torch.diag(W) if W.dim() == 1 else W)
    )
    M = gamma * torch.eye(P, dtype=U.dtype) + U @ Wm @ U.T
    return torch.linalg.solve(M, v.T).T if v.dim() == 2 else torch.linalg.solve(M, v)


@pytest.mark.parametrize("k", [None, 1, 3])
def test_woodbury_matches_dense(k: int | None) -> None:
    P, r, gamma = 70, 10, 0.05
    U = randn(P, r, seed=80)
    v = randn(P, seed=81) if k is None else randn(k, P, seed=81)
    res = solve_woodbury(U, v, gamma)
    assert res.x.shape == v.shape and res.converged and res.iters == 0
    torch.testing.assert_close(res.x, _dense(U, v, gamma), rtol=1e-10, atol=1e-10)
    assert res.residual.shape == (() if k is None else (k,))
    assert (res.residual < 1e-12).all()


def test_woodbury_weights_and_noncontiguous() -> None:
    P, r, gamma = 50, 6, 0.3
    U = randn(P, r, seed=82)
    w = randn(r, seed=83).abs() + 0.1
    Wf = randn(r, r, seed=84)
    Wf = Wf @ Wf.T
    v = randn(P, 4, seed=85).T  # non-contiguous [4, P]
    assert not v.is_contiguous()
    for W in (w, Wf):
        res = solve_woodbury(U, v, gamma, weights=W)
        torch.testing.assert_close(res.x, _dense(U, v, gamma, W), rtol=1e-10, atol=1e-10)
        assert res.converged


def test_woodbury_batched_matches_per_task() -> None:
    M, P, r, k, gamma = 4, 40, 5, 3, 0.1
    U = randn(M, P, r, seed=86)
    v2 = randn(M, P, seed=87)
    v3 = randn(M, k, P, seed=88)
    w = randn(M, r, seed=89).abs()
    for v in (v2, v3):
        res = solve_woodbury_batched(U, v, gamma)
        assert res.x.shape == v.shape and res.converged
        assert res.residual.shape == v.shape[:-1]
        resw = solve_woodbury_batched(U, v, gamma, weights=w)
        for m in range(M):
            torch.testing.assert_close(res.x[m], _dense(U[m], v[m], gamma), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(
                resw.x[m], _dense(U[m], v[m], gamma, w[m]), rtol=1e-10, atol=1e-10
            )


def test_woodbury_float32_and_p1() -> None:
    U = randn(30, 4, seed=90, dtype=torch.float32)
    v = randn(30, seed=91, dtype=torch.float32)
    res = solve_woodbury(U, v, 0.5)
    assert res.x.dtype == torch.float32
    ref = _dense(U.double(), v.double(), 0.5)
    assert_close_normwise(res.x, ref, rtol=1e-5)
    U1 = torch.tensor([[2.0]], dtype=torch.float64)
    res = solve_woodbury(U1, torch.tensor([3.0], dtype=torch.float64), 1.0)
    torch.testing.assert_close(res.x, torch.tensor([0.6], dtype=torch.float64))


def test_woodbury_errors() -> None:
    U = randn(10, 3, seed=92)
    v = randn(10, seed=93)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="damping"):
            solve_woodbury(U, v, bad)
    with pytest.raises(ValueError, match="damping"):
        solve_woodbury_batched(U[None], v[None], 0.0)
    with pytest.raises(ValueError, match="v has shape"):
        solve_woodbury(U, randn(11, seed=94), 1.0)
    with pytest.raises(ValueError, match="weights has shape"):
        solve_woodbury(U, v, 1.0, weights=torch.ones(4, dtype=U.dtype))
    with pytest.raises(ValueError, match="U has 3 dims"):
        solve_woodbury(U[None], v, 1.0)
