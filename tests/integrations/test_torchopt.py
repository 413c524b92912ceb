"""metafluence.integrations.torchopt solvers inside torchopt's custom_root (iMAML toy)."""

import pytest
import torch

torchopt = pytest.importorskip("torchopt")

from metafluence.integrations import torchopt as mt  # noqa: E402

N, D, LAM = 20, 4, 0.7


def inner_loss(params, x, y, kind):
    w, b = params
    z = x @ w + b
    if kind == "ridge":
        return ((z - y) ** 2).mean()
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


def objective(params, meta_params, x, y, kind):
    prox = sum(((p - m) ** 2).sum() for p, m in zip(params, meta_params, strict=True))
    return inner_loss(params, x, y, kind) + 0.5 * LAM * prox


def exact_inner(meta_params, x, y, kind):
    """argmin of the proximal inner objective by Newton's method (no graph)."""
    with torch.no_grad():
        flat = torch.cat([m.detach().reshape(-1) for m in meta_params])

        def f(v):
            return objective((v[:D], v[D]), meta_params, x, y, kind)

        for _ in range(30):
            g = torch.func.grad(f)(flat)
            flat = flat - torch.linalg.solve(torch.func.hessian(f)(flat), g)
    return flat[:D].clone(), flat[D].clone()


def make_solver(solve, kind):
    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0), argnums=1, solve=solve
    )
    def inner_solver(params, meta_params, x, y, kind):
        return exact_inner(meta_params, x, y, kind)

    return inner_solver


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_true = torch.randn(D, generator=g, dtype=torch.float64)
    xq = torch.randn(N, D, generator=g, dtype=torch.float64)
    y, yq = x @ w_true, xq @ w_true
    meta = (0.1 * torch.randn(D, generator=g, dtype=torch.float64), torch.tensor(0.2).double())
    return x, y, xq, yq, meta


def meta_gradient(solve, data, kind):
    x, y, xq, yq, meta = data
    if kind == "logistic":
        y, yq = (y > 0).double(), (yq > 0).double()
    theta = tuple(m.clone().requires_grad_(True) for m in meta)
    init = tuple(torch.zeros_like(m) for m in meta)
    phi = make_solver(solve, kind)(init, theta, x, y, kind)
    inner_loss(phi, xq, yq, kind).backward()
    return torch.cat([t.grad.reshape(-1) for t in theta])


def closed_form_meta_gradient(data):
    """ridge inner problem: phi(theta) = (2/n X'X + lam I)^-1 (2/n X'y + lam theta), exactly."""
    x, y, xq, yq, meta = data
    X1 = torch.cat([x, torch.ones(N, 1, dtype=x.dtype)], 1)
    theta = torch.cat([meta[0], meta[1].reshape(1)]).requires_grad_(True)
    A = 2 / N * X1.T @ X1 + LAM * torch.eye(D + 1, dtype=x.dtype)
    phi = torch.linalg.solve(A, 2 / N * X1.T @ y + LAM * theta)
    inner_loss((phi[:D], phi[D]), xq, yq, "ridge").backward()
    return theta.grad


@pytest.mark.parametrize("kind", ["ridge", "logistic"])
@pytest.mark.parametrize("name", ["cg", "neumann", "direct"])
def test_meta_gradient_matches_torchopt(data, kind, name):
    ref = meta_gradient(torchopt.linear_solve.solve_cg(rtol=1e-12, maxiter=200), data, kind)
    factory = {"cg": mt.solve_cg, "neumann": mt.solve_neumann, "direct": mt.solve_direct}[name]
    opts = {"rtol": 1e-12, "maxiter": 2000} if name != "direct" else {}
    solve = factory(**opts)
    ours = meta_gradient(solve, data, kind)
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)
    assert solve.last_result is not None and solve.last_result.converged
    if kind == "ridge":
        torch.testing.assert_close(ours, closed_form_meta_gradient(data), rtol=1e-8, atol=1e-8)


def test_ridge_and_init_match_torchopt(data):
    ref = meta_gradient(torchopt.linear_solve.solve_cg(ridge=0.5, rtol=1e-12), data, "ridge")
    init = (torch.ones(D, dtype=torch.float64), torch.tensor(1.0).double())
    ours = meta_gradient(mt.solve_cg(ridge=0.5, rtol=1e-12, init=init), data, "ridge")
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-8)


def test_tree_solve_plain_tensor():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x = mt.solve_cg(rtol=1e-12)(lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    xd = {"a": b[:1], "b": b[1:]}
    out = mt.solve_cg(rtol=1e-12)(
        lambda t: dict(zip(t, (A @ torch.cat(list(t.values()))).split(1), strict=True)), xd
    )
    torch.testing.assert_close(torch.cat([out["a"], out["b"]]), torch.linalg.solve(A, b))
