"""Where the time of ``removal_effects`` goes, over M Omniglot-shaped 5-way 1-shot tasks.

Conv-4 (``--width`` filters) or an MLP on 1×28×28 inputs, 15 queries per class, float32, CPU.
For each inner map and each M, times the stages of one influence computation:

- ``point``: inner adaptation of every task (forward solve for the implicit map);
- ``meta_grad``: the total gradient ``∇F``; ``target_grad``: ``∇f`` over 20 target tasks;
- ``hvp_exact`` / ``hvp_gn``: one total-Hessian product (one CG iteration costs one);
- ``scores``: the single mixed product that yields task, support and query scores;
- ``removal_effects``: the whole call with ``--cg-iters`` CG iterations and 5 Lanczos steps
  (only for M ≤ ``--full-max``; above it the total is estimated from the stages).

Appends rows to ``benchmarks/results/influence.csv``.

    python benchmarks/bench_influence.py [--tasks 100 1000] [--width 32] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from harness import RESULTS_DIR, append_csv, machine_info  # noqa: E402


def conv4(width: int, ways: int) -> nn.Module:
    def block(cin: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, width, 3, padding=1),
            nn.GroupNorm(1, width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    body = nn.Sequential(*block(1), *block(width), *block(width), *block(width), nn.Flatten())
    return nn.Sequential(body, nn.Linear(width, ways))


def mlp(width: int, ways: int) -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.Tanh()), nn.Linear(width, ways)
    )


MODELS = {"conv4": conv4, "mlp": mlp}


def omniglot_like_tasks(M: int, ways: int = 5, shots: int = 1, queries: int = 15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(ways * 4, 1, 28, 28, generator=g)
    tasks = []
    for i in range(M):
        cls = torch.randperm(protos.shape[0], generator=g)[:ways]

        def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(ways).repeat_interleave(k)
            x = protos[cls][y] + 0.3 * torch.randn(ways * k, 1, 28, 28, generator=g)
            return x, y

        tasks.append(mf.Task(support=draw(shots), query=draw(queries), id=i))
    return tasks


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


INNERS = {
    "anil-implicit": lambda: mf.inner.HeadOnly(head="1", reg=1.0, solver="direct"),
    "maml-1step": lambda: mf.inner.Unrolled(steps=1, lr=0.4),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--model", choices=list(MODELS), default="conv4")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--inner", nargs="+", default=list(INNERS))
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--full-max", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="M = 20 only")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "influence.csv"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [20] if args.quick else args.tasks
    info = machine_info("cpu")
    torch.manual_seed(0)
    model = MODELS[args.model](args.width, 5)
    target = omniglot_like_tasks(20, seed=1)
    rows = []
    print(f"{'inner':14s} {'M':>5s} {'stage':16s} {'seconds':>9s} {'ms/task':>8s}")
    for inner_name in args.inner:
        prob = mf.MetaProblem(
            model, inner=INNERS[inner_name](), damping=1e-3, chunk_size=args.chunk
        )
        lam = prob.init_params()
        for M in sizes:
            tasks = omniglot_like_tasks(M, seed=2)
            stages: dict[str, float] = {}
            stages["point"], pt = timed(lambda: prob.point(lam, tasks))
            stages["meta_grad"], _ = timed(pt.meta_grad)
            stages["target_grad"], gf = timed(
                lambda: mf.influence.target_gradient(prob, pt.lam, target)
            )
            stages["hvp_exact"], _ = timed(lambda: pt.hvp(gf, "exact"))
            stages["hvp_gn"], _ = timed(lambda: pt.hvp(gf, "gauss_newton"))
            stages["scores"], _ = timed(lambda: pt.hvp_all(gf))
            if M <= args.full_max:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    stages["removal_effects"], _ = timed(
                        lambda: mf.removal_effects(
                            prob,
                            lam,
                            tasks,
                            target=target,
                            solver="cg",
                            lanczos_steps=5,
                            solver_kwargs={"maxiter": args.cg_iters, "check_every": 5},
                        )
                    )
            else:
                stages["removal_effects_est"] = (
                    stages["point"]
                    + stages["target_grad"]
                    + stages["meta_grad"]
                    + (args.cg_iters + 1 + 5) * stages["hvp_exact"]
                    + stages["scores"]
                )
            for stage, sec in stages.items():
                print(f"{inner_name:14s} {M:5d} {stage:16s} {sec:9.3f} {1e3 * sec / M:8.2f}")
                rows.append(
                    {
                        **info,
                        "model": args.model,
                        "inner": inner_name,
                        "M": M,
                        "width": args.width,
                        "P": prob.spec.size,
                        "stage": stage,
                        "seconds": round(sec, 4),
                        "ms_per_task": round(1e3 * sec / M, 3),
                        "cg_iters": args.cg_iters,
                    }
                )
    append_csv(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
