"""K-FAC / EK-FAC factors and solve_ekfac."""

from __future__ import annotations

import pytest
import torch

from metafluence.solvers import (
    KFACFactors,
    compute_kfac_factors,
    dense_matrix,
    ekfac_matvec,
    solve_ekfac,
)
from tests._close import assert_close_normwise

from ._helpers import randn


def _implied_dense(factors: KFACFactors, layer: int, damping: float = 0.0) -> torch.Tensor:
    out, inp = factors.layers[layer].shape
    blocks0 = [torch.zeros(lf.shape, dtype=torch.float64) for lf in factors.layers]

    def mv(x: torch.Tensor) -> torch.Tensor:
        blocks = [b.expand(x.shape[0], *b.shape).clone() for b in blocks0]
        blocks[layer] = x.reshape(x.shape[0], out, inp)
        return ekfac_matvec(factors, blocks, damping)[layer].reshape(x.shape[0], -1)

    return dense_matrix(mv, out * inp, torch.float64)


def _exact_fisher(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    J = (g[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1)  # vec(g aᵀ), row-major
    return J.T @ J / a.shape[0]


@pytest.mark.parametrize("correct", [True, False])
def test_solve_ekfac_inverts_implied_matrix(correct: bool) -> None:
    N = 64
    acts = [randn(N, 5, seed=100), randn(N, 4, seed=101)]
    grads = [randn(N, 3, seed=102), randn(N, 2, seed=103)]
    fac = compute_kfac_factors(acts, grads, correct_eigenvalues=correct)
    assert fac.layers[0].corrected is correct and len(fac) == 2
    damping = 1e-3
    b = [randn(3, 5, seed=104), randn(2, 4, seed=105)]
    x = solve_ekfac(fac, b, damping)
    for i in range(2):
        D = _implied_dense(fac, i, damping)
        torch.testing.assert_close(D, D.T, rtol=1e-12, atol=1e-12)
        ref = torch.linalg.solve(D, b[i].reshape(-1)).reshape(b[i].shape)
        torch.testing.assert_close(x[i], ref, rtol=1e-10, atol=1e-10)
    back = ekfac_matvec(fac, x, damping)
    for i in range(2):
        torch.testing.assert_close(back[i], b[i], rtol=1e-10, atol=1e-10)
    # batched right-hand sides [k, out, in]
    bk = [torch.stack([b[0], 2 * b[0]]), torch.stack([b[1], -b[1]])]
    xk = solve_ekfac(fac, bk, damping)
    torch.testing.assert_close(xk[0][1], 2 * x[0])
    torch.testing.assert_close(xk[1][1], -x[1])


def test_kfac_exact_for_fixed_scalar_activations() -> None:
    N, out = 50, 4
    g = randn(N, out, seed=106)
    a = torch.full((N, 1), 1.7, dtype=torch.float64)
    F = _exact_fisher(a, g)
    for correct in (False, True):
        fac = compute_kfac_factors([a], [g], correct_eigenvalues=correct)
        torch.testing.assert_close(_implied_dense(fac, 0), F, rtol=1e-10, atol=1e-12)
    # also exact when every sample shares one activation vector
    a_vec = randn(1, 3, seed=107).expand(N, 3)
    fac = compute_kfac_factors([a_vec], [g], correct_eigenvalues=False)
    torch.testing.assert_close(
        _implied_dense(fac, 0), _exact_fisher(a_vec, g), rtol=1e-9, atol=1e-10
    )


def test_ekfac_is_closer_than_kfac() -> None:
    # EK-FAC is the best diagonal in the K-FAC eigenbasis (Frobenius), so never worse than K-FAC
    N = 200
    a = torch.tanh(randn(N, 4, seed=108) @ randn(4, 4, seed=109))
    g = randn(N, 3, seed=110) * (1 + a[:, :1] ** 2)
    F = _exact_fisher(a, g)
    ek = _implied_dense(compute_kfac_factors([a], [g]), 0)
    k = _implied_dense(compute_kfac_factors([a], [g], correct_eigenvalues=False), 0)
    assert torch.linalg.norm(F - ek) <= torch.linalg.norm(F - k) + 1e-12


def test_ekfac_sequence_inputs_match_per_sample_definition() -> None:
    N, T = 6, 3
    a = randn(N, T, 4, seed=111)
    g = randn(N, T, 2, seed=112)
    fac = compute_kfac_factors([a], [g], chunk=4)
    lf = fac.layers[0]
    Gn = torch.einsum("nto,nti->noi", g, a)  # per-sample weight gradients
    lam = (lf.to_eigenbasis(Gn) ** 2).mean(0)
    torch.testing.assert_close(lf.eigvals, lam)
    fac1 = compute_kfac_factors([a[:, :1].squeeze(1)], [g[:, :1].squeeze(1)])
    fac3 = compute_kfac_factors([a[:, :1]], [g[:, :1]])
    torch.testing.assert_close(fac1.layers[0].eigvals, fac3.layers[0].eigvals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ekfac_ihvp_correlates_with_exact_fisher(seed: int) -> None:
    # softmax-regression head on tanh features (the inner problem of head-only adaptation),
    # Fisher with labels sampled from the model; right-hand side: a query-set gradient
    gen = torch.Generator().manual_seed(seed)
    N, d_in, C = 500, 10, 5
    dt = torch.float64
    W = torch.randn(C, d_in + 1, generator=gen, dtype=dt) / d_in**0.5

    def acts(n: int) -> torch.Tensor:
        x = torch.randn(n, d_in, generator=gen, dtype=dt)
        return torch.cat([torch.tanh(x), torch.ones(n, 1, dtype=dt)], 1)

    a = acts(N)
    p = torch.softmax(a @ W.T, 1)
    y = torch.multinomial(p, 1, generator=gen).squeeze(1)
    g = p - torch.nn.functional.one_hot(y, C).to(dt)
    F = _exact_fisher(a, g)
    aq = acts(20)
    yq = torch.randint(0, C, (20,), generator=gen)
    gq = torch.softmax(aq @ W.T, 1) - torch.nn.functional.one_hot(yq, C).to(dt)
    b = (gq[:, :, None] * aq[:, None, :]).mean(0)  # [C, d_in + 1]
    damping = 1e-2 * float(torch.diagonal(F).mean())
    exact = torch.linalg.solve(F + damping * torch.eye(F.shape[0], dtype=dt), b.reshape(-1))
    approx = solve_ekfac(compute_kfac_factors([a], [g]), [b], damping)[0].reshape(-1)
    corr = torch.corrcoef(torch.stack([approx, exact]))[0, 1]
    assert corr > 0.9


def test_ekfac_errors_and_float32() -> None:
    a, g = randn(10, 3, seed=113), randn(10, 2, seed=114)
    with pytest.raises(ValueError, match="grad_outputs"):
        compute_kfac_factors([a], [g, g])
    with pytest.raises(ValueError, match="leading"):
        compute_kfac_factors([a], [g[:9]])
    fac = compute_kfac_factors([a], [g])
    with pytest.raises(ValueError, match="b_blocks"):
        solve_ekfac(fac, [torch.zeros(3, 2, dtype=torch.float64)], 1.0)
    with pytest.raises(ValueError, match="damping"):
        solve_ekfac(fac, [torch.zeros(2, 3, dtype=torch.float64)], -1.0)
    fac_rank_def = compute_kfac_factors([a[:1]], [g[:1]])  # one sample: singular factors
    with pytest.raises(ValueError, match="damping"):
        solve_ekfac(fac_rank_def, [torch.ones(2, 3, dtype=torch.float64)], 0.0)
    fac32 = KFACFactors.from_activations([a.float()], [g.float()])
    b = randn(2, 3, seed=115, dtype=torch.float32)
    x = solve_ekfac(fac32, [b], 0.1)[0]
    assert x.dtype == torch.float32
    x64 = solve_ekfac(fac, [b.double()], 0.1)[0]
    assert_close_normwise(x, x64, rtol=1e-5)
