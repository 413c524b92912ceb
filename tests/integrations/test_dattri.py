"""metafluence.integrations.dattri vs dattri 0.3.0 and an explicit solve (logistic regression)."""

import pytest
import torch

pytest.importorskip("dattri")
import dattri.func.hessian as dh  # noqa: E402

from metafluence.integrations import dattri as md  # noqa: E402

N, D = 24, 5
P = D + 1


def loss(params, x, y):
    w, b = params[:D], params[D]
    z = x @ w + b
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 1e-3 * params @ params


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(N, generator=g, dtype=torch.float64) > 0).double()
    params = 0.3 * torch.randn(P, generator=g, dtype=torch.float64)
    H = torch.func.hessian(loss)(params, x, y)
    v = torch.randn(3, P, generator=g, dtype=torch.float64)
    return params, x, y, H, v


def explicit(H, v, reg=0.0):
    A = H + reg * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.solve(A, v.T).T


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_cg_matches_explicit_and_dattri(toy, mode):
    params, x, y, H, v = toy
    ref = explicit(H, v, 0.01)
    ours = md.ihvp_cg(loss, max_iter=50, tol=1e-12, mode=mode, regularization=0.01)
    out = ours((params, x, y), v)
    assert out.shape == (3, P)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-8)
    if mode == "rev-rev":  # dattri 0.3.0's rev-fwd HVP makes a float32 tangent (fails in fp64)
        theirs = dh.ihvp_cg(loss, max_iter=P, mode=mode, regularization=0.01)
        torch.testing.assert_close(theirs((params, x, y), v), ref, rtol=1e-6, atol=1e-6)
    # 1-D v gives [1, P], like dattri
    assert ours((params, x, y), v[0]).shape == (1, P)


def test_cg_truncated_iterates_match_dattri(toy):
    """Same start (x0 = v) and same recurrence: after 2 iterations both give the same iterate."""
    params, x, y, _, v = toy
    ours = md.ihvp_cg(loss, max_iter=2, tol=0.0)((params, x, y), v)
    theirs = dh.ihvp_cg(loss, max_iter=2)((params, x, y), v)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


def test_cg_tol_per_column(toy):
    """A column already within tol stops at once (x = x0 = v); the other runs to the solution."""
    params, x, y, H, v = toy
    b = torch.stack([v[0], 1e-12 * v[1]])
    res = md.ihvp_at_x_cg(loss, params, x, y, max_iter=50, tol=1e-9, return_result=True)(b)
    assert res.converged
    torch.testing.assert_close(res.x[1], b[1], rtol=0, atol=0)
    torch.testing.assert_close(res.x[0], explicit(H, b[:1])[0], rtol=1e-7, atol=1e-7)
    r = b - b @ H
    r0 = b[0] - H @ res.x[0]
    assert r0.norm() <= 1e-9 and r[1].norm() <= 1e-9


def test_lissa_matches_explicit_and_dattri(toy):
    params, x, y, H, v = toy
    damping, scaling = 0.01, 2.0
    ref = explicit(H, v, damping * scaling)
    kw = dict(batch_size=N, recursion_depth=400, damping=damping, scaling=scaling)
    dims = (None, 0, 0)
    ours = md.ihvp_lissa(loss, **kw)((params, x, y), v, in_dims=dims)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    theirs = dh.ihvp_lissa(loss, **kw)((params, x, y), v, in_dims=dims)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_lissa_minibatch_expectation(toy):
    """batch_size < n: the operator is the average of chunk Hessians (= H for a mean loss)."""
    params, x, y, H, v = toy
    ours = md.ihvp_lissa(loss, batch_size=6, recursion_depth=800, damping=0.01, scaling=2.0)(
        (params, x, y), v, in_dims=(None, 0, 0)
    )
    torch.testing.assert_close(ours, explicit(H, v, 0.02), rtol=1e-5, atol=1e-5)


def test_arnoldi_matches_explicit_and_dattri(toy):
    params, x, y, H, v = toy
    ref = explicit(H, v, 0.01)
    kw = dict(max_iter=P + 1, regularization=0.01, mode="rev-rev")
    ours = md.ihvp_arnoldi(loss, **kw)((params, x, y), v)
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-7)
    # dattri 0.3.0's Arnoldi only runs in fp32 (fp32 start vector and Hessenberg matrix)
    f32 = tuple(t.float() for t in (params, x, y))
    # (its fp32 Gram-Schmidt error depends on its random start vector: seed it, and compare on
    # the scale of the solution)
    torch.manual_seed(0)
    theirs = dh.ihvp_arnoldi(loss, **kw)(f32, v.float())
    ours32 = md.ihvp_arnoldi(loss, **kw)(f32, v.float())
    assert ours32.dtype == torch.float32
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours32.double(), ref, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(ours32, theirs, rtol=1e-3, atol=1e-3 * scale)


def test_dataset_cg_inverts_the_dataset_hessian(toy):
    params, x, y, H, v = toy
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, N, 8)]
    out = md.ihvp_dataset_cg(loss, params, loader, v, max_iter=50, tol=1e-12)
    torch.testing.assert_close(out, explicit(H, v), rtol=1e-8, atol=1e-8)
    # not the mean of per-batch inverses (what summing dattri's per-batch ihvp gives)
    per_batch = sum(
        explicit(torch.func.hessian(loss)(params, xb, yb), v) for xb, yb in loader
    ) / len(loader)
    assert not torch.allclose(out, per_batch, rtol=1e-3, atol=1e-3)
    res = md.ihvp_dataset_cg(loss, params, loader, v, tol=1e-12, return_result=True)
    assert res.converged


def test_dataset_cg_sum_reduction(toy):
    params, x, y, H, v = toy

    def sum_loss(p, xb, yb):
        return loss(p, xb, yb) * xb.shape[0]

    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, N, 8)]
    out = md.ihvp_dataset_cg(sum_loss, params, loader, v, tol=1e-12, reduction="sum")
    Hsum = sum(torch.func.hessian(sum_loss)(params, xb, yb) for xb, yb in loader)
    torch.testing.assert_close(out, explicit(Hsum, v), rtol=1e-8, atol=1e-8)
