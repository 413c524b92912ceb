"""iMAML meta-gradient with torchopt's implicit differentiation and a metafluence solver.

    python examples/imaml_torchopt.py [--tiny]

The inner problem is proximal: ``φ*(θ) = argmin_φ L_train(φ) + λ/2 ‖φ − θ‖²``. torchopt's
``custom_root`` differentiates through the optimality condition ``∇_φ(...) = 0``; it needs a
linear solver ``solve(matvec, b)``: here :func:`metafluence.integrations.torchopt.solve_cg`.
"""

from __future__ import annotations

import argparse

import torch

try:
    import torchopt
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs torchopt: pip install torchopt") from None

from metafluence.integrations.torchopt import solve_cg

LAM = 1.0


def inner_objective(phi, theta, x, y):
    w, b = phi
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
    return loss + 0.5 * LAM * sum(((p - t) ** 2).sum() for p, t in zip(phi, theta, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    n_tasks = 4 if args.tiny else args.tasks
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    d = 5
    solve = solve_cg(rtol=1e-10, maxiter=100)

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(inner_objective, argnums=0), argnums=1, solve=solve
    )
    def inner_solver(phi0, theta, x, y):
        phi = tuple(t.detach().clone().requires_grad_(True) for t in phi0)
        opt = torch.optim.LBFGS(
            phi, max_iter=100, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            loss = inner_objective(phi, theta, x, y)
            loss.backward()
            return loss

        opt.step(closure)
        return tuple(t.detach() for t in phi)

    theta = (
        torch.zeros(d, dtype=torch.float64, requires_grad=True),
        torch.zeros((), dtype=torch.float64, requires_grad=True),
    )
    w_shared = torch.ones(d, dtype=torch.float64)  # tasks share structure: meta-learning helps
    tasks = []
    for _ in range(n_tasks):
        w_task = w_shared + 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
        xs, xq = (torch.randn(10, d, generator=g, dtype=torch.float64) for _ in range(2))
        tasks.append((xs, (xs @ w_task > 0).double(), xq, (xq @ w_task > 0).double()))
    meta_opt = torch.optim.SGD(theta, lr=0.5)
    for step in range(3):
        meta_opt.zero_grad()
        total = 0.0
        for xs, ys, xq, yq in tasks:
            theta_d = tuple(t.detach() for t in theta)
            phi = inner_solver(theta_d, theta, xs, ys)
            q = torch.nn.functional.binary_cross_entropy_with_logits(xq @ phi[0] + phi[1], yq)
            (q / n_tasks).backward()
            total += q.item() / n_tasks
        meta_opt.step()
        r = solve.last_result
        print(
            f"meta step {step}: query loss {total:.4f}, last CG solve {r.iters} iterations, "
            f"residual {float(r.residual):.1e}"
        )


if __name__ == "__main__":
    main()
