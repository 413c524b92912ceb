"""metafluence as the iHVP backend of dattri-style influence functions (logistic regression).

    python examples/dattri_backend.py [--tiny]

``metafluence.integrations.dattri.ihvp_cg`` has dattri 0.3.0's signature: swap the import in
code written for ``dattri.func.hessian.ihvp_cg``. Every test gradient is one column of a single
batched CG solve, and each column stops at ``tol`` on its own. ``ihvp_dataset_cg`` inverts the
Hessian of the whole training set accumulated over a loader (not a sum of per-batch inverses).
Influence of train point i on test point j (dattri's convention for IF):
``score[i, j] = g_train_iᵀ H⁻¹ g_test_j``.
"""

from __future__ import annotations

import argparse

import torch

from metafluence.integrations.dattri import ihvp_cg, ihvp_dataset_cg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    n = 60 if args.tiny else args.n
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    d = 8
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, generator=g, dtype=torch.float64) > 0).double()
    xt = torch.randn(5, d, generator=g, dtype=torch.float64)
    yt = (xt[:, 0] > 0).double()

    def loss(w, xb, yb):  # mean loss + small L2 (strictly convex)
        logits = xb @ w
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, yb)
        return bce + 1e-2 * w @ w

    w = torch.zeros(d, dtype=torch.float64)
    for _ in range(20):  # Newton's method: train to optimality
        gr = torch.func.grad(loss)(w, x, y)
        w = w - torch.linalg.solve(torch.func.hessian(loss)(w, x, y), gr)

    def per_example(xb, yb):  # [B, d] per-example gradients
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
            w, xb.unsqueeze(1), yb.unsqueeze(1)
        )

    g_test, g_train = per_example(xt, yt), per_example(x, y)

    # drop-in for dattri.func.hessian.ihvp_cg (same arguments, same [k, P] result)
    ihvp = ihvp_cg(loss, argnums=0, max_iter=50, tol=1e-10)
    s_test = ihvp((w, x, y), g_test)  # [5, d]: one batched solve for all test points
    scores = g_train @ s_test.T  # [n, 5]
    print("score matrix", tuple(scores.shape))
    print("top-3 train points for test 0:", torch.topk(scores[:, 0], 3).indices.tolist())

    # whole-dataset operator over a loader of mini-batches: the same inverse
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]
    s_data = ihvp_dataset_cg(loss, w, loader, g_test, max_iter=50, tol=1e-10)
    print("dataset CG vs full-batch CG, max |diff|:", float((s_data - s_test).abs().max()))
    explicit = torch.linalg.solve(torch.func.hessian(loss)(w, x, y), g_test.T).T
    print("vs explicit torch.linalg.solve, max |diff|:", float((s_test - explicit).abs().max()))

    try:
        from dattri.func.hessian import ihvp_cg as dattri_ihvp_cg
    except ImportError:
        print("dattri not installed: skipping the comparison with dattri")
        return
    theirs = dattri_ihvp_cg(loss, argnums=0, max_iter=d)((w, x, y), g_test)
    print("vs dattri's own ihvp_cg, max |diff|:", float((s_test - theirs).abs().max()))


if __name__ == "__main__":
    main()
