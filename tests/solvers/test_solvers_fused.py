"""solve_cg / solve_neumann: the fused vector updates (native / Triton) give the plain-PyTorch
loop's results (same iterations, same x to rounding), with and without shrink / preconditioner,
and fall back to the plain loop when a gradient flows through the solve."""

from __future__ import annotations

import pytest
import torch

from metafluence import _loader
from metafluence.solvers import solve_cg, solve_neumann
from tests._close import assert_close_maxnorm

NATIVE = _loader.has_kernel("cg_update_", "cpu")
pytestmark = pytest.mark.skipif(not NATIVE, reason="no native CPU kernel")
RTOL = {torch.float64: 1e-7, torch.float32: 1e-3}  # two runs differing by rounding only

SOLVE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _close(out, ref, dtype, what=""):
    assert_close_maxnorm(out, ref, RTOL[dtype], what)


def _spd(k, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(P, 8, generator=g, dtype=torch.float64) / 3
    d = torch.rand(P, generator=g, dtype=torch.float64) + 0.5
    U, d = U.to(dtype), d.to(dtype)
    B = torch.randn(k, P, generator=g, dtype=torch.float64).to(dtype)
    B[1] = 0.0  # a zero column

    def mv(v):
        return d * v + (v @ U) @ U.T

    return mv, B, d


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shrink", [True, False])
@pytest.mark.parametrize("precond", [False, True])
def test_cg_fused_matches_plain(dtype, shrink, precond):
    mv, B, d = _spd(7, 97, dtype)
    pc = (lambda v: v / d) if precond else None
    kw = dict(
        rtol=SOLVE_RTOL[dtype], maxiter=200, check_every=3, shrink=shrink, precond=pc, damping=0.1
    )
    a = solve_cg(mv, B, fused=True, **kw)
    b = solve_cg(mv, B, fused=False, **kw)
    assert a.converged and b.converged
    _close(a.x, b.x, dtype)
    diff = (a.info["column_iters"] - b.info["column_iters"]).abs().max()
    assert diff <= 3  # a column may be verified at the next check point (check_every = 3)


def test_cg_fused_negative_curvature():
    mv, B, d = _spd(4, 31, torch.float64)
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        a = solve_cg(lambda v: -mv(v), B, fused=True, maxiter=10)
    assert a.negative_curvature and a.info["negative_curvature_columns"] == [0, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shrink", [True, False])
def test_neumann_fused_matches_plain(dtype, shrink):
    mv, B, _ = _spd(5, 61, dtype)
    kw = dict(rtol=1e-5, maxiter=300, check_every=4, shrink=shrink, damping=0.5)
    a = solve_neumann(mv, B, fused=True, **kw)
    b = solve_neumann(mv, B, fused=False, **kw)
    assert a.converged == b.converged
    _close(a.x, b.x, dtype)
    assert torch.equal(a.info["column_iters"], b.info["column_iters"])
    assert a.info["scale"] == b.info["scale"]


def test_neumann_fused_scale_doubling():
    mv, B, _ = _spd(3, 41, torch.float64)
    kw = dict(rtol=1e-6, maxiter=400, check_every=5, scale=0.2, damping=0.5)
    with pytest.warns(RuntimeWarning):
        a = solve_neumann(mv, B, fused=True, **kw)
    with pytest.warns(RuntimeWarning):
        b = solve_neumann(mv, B, fused=False, **kw)
    _close(a.x, b.x, torch.float64)


def test_gradient_flows_through_plain_path():
    mv, B, _ = _spd(3, 17, torch.float64)
    Bg = B.clone().requires_grad_(True)
    for solve in (solve_cg, solve_neumann):
        x = solve(mv, Bg, maxiter=50, damping=0.5).x
        (g,) = torch.autograd.grad(x.sum(), Bg)
        assert torch.isfinite(g).all()
    w = torch.ones(17, dtype=torch.float64, requires_grad=True)  # grad through the matvec only
    for solve in (solve_cg, solve_neumann):
        x = solve(lambda v: mv(v) * w, B, maxiter=50, damping=0.5).x
        (g,) = torch.autograd.grad(x.sum(), w)
        assert torch.isfinite(g).all()
