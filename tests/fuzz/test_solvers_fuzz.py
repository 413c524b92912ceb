"""Property-based tests of :mod:`metafluence.solvers` on random SPD systems against
``torch.linalg.solve``: random size P (incl. 1 and odd sizes), 1-D ``b`` or k right-hand sides
(k = 1 included), damping, float32 / float64; and bad inputs (wrong ndim, mismatched sizes,
wrong dtype, NaN/Inf, negative damping, wrong device strings) that must raise ``ValueError`` /
``TypeError`` naming the argument, never crash or hang.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metafluence import solvers
from tests._close import rel_err

from ._strategies import FAST, FEW, dtypes, randn, seeds

#: solution tolerance (relative, in the 2-norm) per dtype for the exact / converged solvers
TOL = {torch.float32: 2e-3, torch.float64: 1e-8}

sizes = st.integers(1, 13)
rhs = st.sampled_from([None, 1, 2, 5])  # None: b is [P]
dampings = st.sampled_from([0.0, 1e-3, 0.5])


def _spd(P, seed, dtype, cond=20.0):
    """``A = Q diag(λ) Qᵀ`` with ``λ`` spread over ``[1/cond, 1]`` (float64 construction)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.logspace(0.0, -torch.log10(torch.tensor(cond)).item(), P, dtype=torch.float64)
    lam = lam[torch.randperm(P, generator=g)]
    A = (Q * lam) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def _rhs(P, k, seed, dtype):
    return randn((P,) if k is None else (k, P), seed + 7, dtype)


def _exact(A, b, damping):
    M = A.double() + damping * torch.eye(A.shape[0], dtype=torch.float64)
    x = torch.linalg.solve(M, b.double().reshape(-1, A.shape[0]).T).T
    return x.reshape(b.shape)


def _mv(A):
    return lambda v: v @ A.T  # [P] -> [P], [k', P] -> [k', P]


def _check(res, b, ref, dtype, what, tol_scale=1.0):
    assert res.x.shape == b.shape and res.x.dtype == b.dtype, what
    want_res_shape = () if b.dim() == 1 else (b.shape[0],)
    assert tuple(res.residual.shape) == want_res_shape, what
    assert rel_err(res.x, ref) <= TOL[dtype] * tol_scale, (
        f"{what}: rel err {rel_err(res.x, ref):.2e}"
    )


@FAST
@given(P=sizes, k=rhs, damping=dampings, seed=seeds, dtype=dtypes, fused=st.booleans())
def test_cg_matches_linalg_solve(P, k, damping, seed, dtype, fused):
    A, b = _spd(P, seed, dtype), _rhs(P, k, seed, dtype)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    res = solvers.solve_cg(_mv(A), b, damping=damping, rtol=rtol, maxiter=6 * P + 20, fused=fused)
    assert res.converged, f"cg did not converge: residual {res.residual}"
    _check(res, b, _exact(A, b, damping), dtype, "cg", tol_scale=20.0)


@FAST
@given(P=sizes, k=rhs, damping=dampings, seed=seeds, dtype=dtypes)
def test_direct_matches_linalg_solve(P, k, damping, seed, dtype):
    A, b = _spd(P, seed, dtype), _rhs(P, k, seed, dtype)
    res = solvers.solve_direct(_mv(A), b, damping=damping)
    assert res.converged and res.info["method"] == "cholesky"
    _check(res, b, _exact(A, b, damping), dtype, "direct")


@FAST
@given(P=sizes, k=rhs, damping=dampings, seed=seeds)
def test_arnoldi_full_rank_matches_linalg_solve(P, k, damping, seed):
    """With ``rank = iters = P`` the top eigenspace is the whole space: the solve is exact."""
    dtype = torch.float64
    A, b = _spd(P, seed, dtype), _rhs(P, k, seed, dtype)
    res = solvers.solve_arnoldi(_mv(A), b, damping=damping, rank=P, iters=P, seed=seed % 1000)
    _check(res, b, _exact(A, b, damping), dtype, "arnoldi", tol_scale=1e3)


@FEW
@given(P=st.integers(1, 8), k=rhs, damping=st.sampled_from([0.0, 0.5]), seed=seeds)
def test_neumann_matches_linalg_solve(P, k, damping, seed):
    """Well-conditioned systems (cond <= 4): the series converges in a few hundred steps."""
    dtype = torch.float64
    A, b = _spd(P, seed, dtype, cond=4.0), _rhs(P, k, seed, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = solvers.solve_neumann(_mv(A), b, damping=damping, rtol=1e-10, maxiter=600)
    assert res.converged, f"neumann residual {res.residual}"
    _check(res, b, _exact(A, b, damping), dtype, "neumann", tol_scale=1e3)


@FAST
@given(
    P=sizes,
    r=st.integers(1, 6),
    k=rhs,
    gamma=st.sampled_from([1e-2, 0.3, 2.0]),
    weights=st.sampled_from([None, "diag", "full"]),
    seed=seeds,
    dtype=dtypes,
)
def test_woodbury_matches_linalg_solve(P, r, k, gamma, weights, seed, dtype):
    U = randn((P, r), seed, dtype)
    W = None
    if weights == "diag":
        W = torch.rand(r, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.1
    elif weights == "full":
        C = randn((r, r), seed + 1, dtype)
        W = C @ C.T + 0.1 * torch.eye(r, dtype=dtype)
    Wd = (
        torch.eye(r, dtype=torch.float64)
        if W is None
        else (torch.diag(W.double()) if W.dim() == 1 else W.double())
    )
    A = (U.double() @ Wd @ U.double().T).to(dtype)
    b = _rhs(P, k, seed, dtype)
    res = solvers.solve_woodbury(U, b, gamma, weights=W)
    tol = 50.0 / gamma if dtype == torch.float32 else 1.0
    _check(res, b, _exact(A, b, gamma), dtype, "woodbury", tol_scale=tol)


@FEW
@given(M=st.integers(1, 4), P=sizes, r=st.integers(1, 4), k=rhs, seed=seeds)
def test_woodbury_batched_matches_per_task(M, P, r, k, seed):
    dtype = torch.float64
    U = randn((M, P, r), seed, dtype)
    v = randn((M, P) if k is None else (M, k, P), seed + 1, dtype)
    res = solvers.solve_woodbury_batched(U, v, 0.4)
    for m in range(M):
        ref = _exact(U[m] @ U[m].T, v[m], 0.4)
        assert rel_err(res.x[m], ref) <= TOL[dtype], f"task {m}"


@FEW
@given(
    layers=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    n=st.integers(1, 12),
    k=st.sampled_from([None, 1, 3]),
    damping=st.sampled_from([1e-3, 0.5]),
    correct=st.booleans(),
    seed=seeds,
)
def test_ekfac_solve_inverts_its_dense_matrix(layers, n, k, damping, correct, seed):
    """``solve_ekfac`` equals ``torch.linalg.solve`` against the dense matrix of
    ``ekfac_matvec`` (built column by column), layer by layer."""
    dtype = torch.float64
    acts = [randn((n, i), seed + 2 * j, dtype) for j, (o, i) in enumerate(layers)]
    gos = [randn((n, o), seed + 2 * j + 1, dtype) for j, (o, i) in enumerate(layers)]
    f = solvers.compute_kfac_factors(acts, gos, correct_eigenvalues=correct)
    bs = [
        randn((o, i) if k is None else (k, o, i), seed + 99 + j, dtype)
        for j, (o, i) in enumerate(layers)
    ]
    xs = solvers.solve_ekfac(f, bs, damping=damping)
    for j, ((o, i), b, x) in enumerate(zip(layers, bs, xs, strict=True)):
        eye = torch.eye(o * i, dtype=dtype).reshape(o * i, o, i)
        blocks = [torch.zeros(o * i, oo, ii, dtype=dtype) for oo, ii in layers]
        blocks[j] = eye
        D = solvers.ekfac_matvec(f, blocks, damping=damping)[j].reshape(o * i, o * i).T
        ref = torch.linalg.solve(D, b.reshape(-1, o * i).T).T.reshape(b.shape)
        assert x.shape == b.shape
        assert rel_err(x, ref) <= 1e-8, f"layer {j}: rel err {rel_err(x, ref):.2e}"


# ---- bad inputs ---------------------------------------------------------------------------------

TOTAL = ["cg", "neumann", "direct", "arnoldi"]
A3 = torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize("name", TOTAL)
@pytest.mark.parametrize(
    "b, damping, err, words",
    [
        (torch.zeros(2, 2, 3, dtype=torch.float64), 0.0, ValueError, "b has 3 dims"),
        (torch.zeros(0, 1, 2, 3), 0.0, ValueError, "b has 4 dims"),
        (torch.ones(3, dtype=torch.int64), 0.0, TypeError, "b has dtype torch.int64"),
        ([1.0, 2.0, 3.0], 0.0, TypeError, "b must be a torch.Tensor"),
        (
            torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64),
            0.0,
            ValueError,
            "b contains NaN or Inf",
        ),
        (
            torch.tensor([[1.0, float("inf"), 0.0]], dtype=torch.float64),
            0.0,
            ValueError,
            "b contains NaN or Inf",
        ),
        (torch.ones(3, dtype=torch.float64), -1.0, ValueError, "damping=-1.0: expected >= 0"),
        (
            torch.ones(3, dtype=torch.float64),
            float("nan"),
            ValueError,
            "damping=nan: expected a finite number",
        ),
        (torch.ones(3, dtype=torch.float64), "big", TypeError, "damping must be a float"),
        (torch.ones(3, dtype=torch.float64), torch.ones(2), ValueError, "damping must be a float"),
    ],
)
def test_total_solvers_bad_b_and_damping(name, b, damping, err, words):
    with pytest.raises(err, match=_re(words)):
        solvers.get_solver(name)(_mv(A3), b, damping=damping)


@pytest.mark.parametrize("name", TOTAL)
def test_total_solvers_bad_matvec(name):
    b = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="matvec must be callable"):
        solvers.get_solver(name)("A", b)
    cases = [
        (lambda v: v[..., :2], ValueError, "matvec returned shape"),
        (lambda v: v.float(), ValueError, "matvec returned dtype torch.float32"),
        (lambda v: v.tolist(), TypeError, "matvec returned list"),
        (lambda v: v.to("meta"), ValueError, "matvec returned a tensor on meta"),
    ]
    for mv, err, words in cases:
        with pytest.raises(err, match=_re(words)):
            solvers.get_solver(name)(mv, b)


def test_cg_bad_options():
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x0 has shape \[2\]"):
        solvers.solve_cg(_mv(A3), b, x0=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="maxiter=-1: expected >= 0"):
        solvers.solve_cg(_mv(A3), b, maxiter=-1)
    with pytest.raises(TypeError, match="maxiter must be an int"):
        solvers.solve_cg(_mv(A3), b, maxiter=2.5)
    with pytest.raises(ValueError, match="rtol and atol"):
        solvers.solve_cg(_mv(A3), b, rtol=-1.0)
    with pytest.raises(ValueError, match="check_every=0: expected >= 1"):
        solvers.solve_cg(_mv(A3), b, check_every=0)
    with pytest.raises(TypeError, match="precond must be callable"):
        solvers.solve_cg(_mv(A3), b, precond=3)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        solvers.solve_neumann(_mv(A3), b, scale=-2.0)
    with pytest.raises(ValueError, match=r"dim=4 does not match b"):
        solvers.solve_direct(_mv(A3), b, dim=4)
    with pytest.raises(ValueError, match="iters=1 must be >= rank=3"):
        solvers.solve_arnoldi(_mv(A3), b, rank=3, iters=1)
    with pytest.raises(ValueError, match="unknown solver 'lu'"):
        solvers.get_solver("lu")


def test_empty_systems_do_not_hang():
    """P = 0 and k = 0 return empty results immediately."""
    for name in TOTAL:
        for b in (torch.zeros(0, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)):
            res = solvers.get_solver(name)(_mv(A3[: b.shape[-1], : b.shape[-1]]), b)
            assert res.x.shape == b.shape, name


@pytest.mark.parametrize("device", ["cdua", "gpu:0", "cuda:x"])
def test_bad_device_strings(device):
    with pytest.raises(ValueError, match=rf"device={device!r}"):
        solvers.dense_matrix(_mv(A3), 3, device=device)
    with pytest.raises(ValueError, match=rf"device={device!r}"):
        solvers.estimate_top_eigenvalue(_mv(A3), 3, device=device)


def test_woodbury_bad_inputs():
    U = torch.ones(4, 2, dtype=torch.float64)
    v = torch.ones(4, dtype=torch.float64)
    cases = [
        (dict(U=U[0]), ValueError, "U has 1 dims"),
        (dict(v=torch.ones(5, dtype=torch.float64)), ValueError, "v has shape [5]"),
        (dict(damping=0.0), ValueError, "damping=0.0: expected > 0"),
        (dict(weights=torch.ones(3, dtype=torch.float64)), ValueError, "weights has shape [3]"),
        (dict(U=U.long()), TypeError, "U has dtype torch.int64"),
        (dict(U=[[1.0]]), TypeError, "U must be a torch.Tensor"),
        (dict(v=[1.0] * 4), TypeError, "v must be a torch.Tensor"),
        (dict(v=v.to("meta")), ValueError, "v is on meta"),
        (dict(U=U.clone().fill_(float("nan"))), ValueError, "U contains NaN or Inf"),
        (
            dict(v=torch.full((4,), float("inf"), dtype=torch.float64)),
            ValueError,
            "v contains NaN or Inf",
        ),
    ]
    for over, err, words in cases:
        kw = dict(U=U, v=v, damping=0.1)
        kw.update(over)
        with pytest.raises(err, match=_re(words)):
            solvers.solve_woodbury(**kw)
    with pytest.raises(ValueError, match=r"v has shape \[3, 4\]"):
        solvers.solve_woodbury_batched(U[None].expand(2, 4, 2), torch.ones(3, 4), 0.1)


def test_ekfac_bad_inputs():
    a, g = torch.ones(5, 3), torch.ones(5, 2)
    with pytest.raises(ValueError, match="activations has 1 layers but grad_outputs has 2"):
        solvers.compute_kfac_factors([a], [g, g])
    with pytest.raises(ValueError, match="activations has 1 layers but grad_outputs has 2"):
        solvers.compute_kfac_factors_batched([a[None]], [g[None], g[None]])
    with pytest.raises(ValueError, match="layer 0: activations has N=0"):
        solvers.compute_kfac_factors([a[:0]], [g[:0]])
    with pytest.raises(ValueError, match="disagree on the leading"):
        solvers.compute_kfac_factors([a], [g[:4]])
    with pytest.raises(ValueError, match="layer 0: activations contains NaN or Inf"):
        solvers.compute_kfac_factors([a.clone().fill_(float("nan"))], [g])
    with pytest.raises(TypeError, match="layer 0: grad_outputs has dtype torch.int64"):
        solvers.compute_kfac_factors([a], [g.long()])
    f = solvers.compute_kfac_factors([torch.randn(9, 3)], [torch.randn(9, 2)])
    with pytest.raises(ValueError, match="b_blocks has 2 blocks"):
        solvers.solve_ekfac(f, [torch.ones(2, 3)] * 2, damping=0.1)
    with pytest.raises(ValueError, match=r"b_blocks\[0\] has shape \[3, 2\]"):
        solvers.solve_ekfac(f, [torch.ones(3, 2)], damping=0.1)
    with pytest.raises(ValueError, match="damping=-0.1: expected >= 0"):
        solvers.solve_ekfac(f, [torch.ones(2, 3)], damping=-0.1)


def _re(s: str) -> str:
    import re

    return re.escape(s)
