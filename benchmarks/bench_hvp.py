"""Benchmark the total HVP over a meta-batch (issue 4 item 5): task-batched vs a per-task loop.

M Omniglot-shaped tasks (5-way 1-shot, 15 queries per class, 1×28×28), a small MLP on flattened
inputs (body 784→32, head 32→5), curvature ``exact`` and ``gauss_newton``, inner maps: 1-step
unrolled (MAML) and head-only implicit (proximal, reg γ). Batched: ``problem.point(λ, tasks)
.hvp(D)`` (vmapped across tasks in chunks of ``chunk_size``); loop: M points of one task each
(``task_weight = 1/M``), summed. The two are checked to agree before timing; a profile of the
batched path is printed (top operators).

    python benchmarks/bench_hvp.py [--tasks 1000] [--loop-tasks 1000] [--threads 1] [--only unr]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PEAK_GFLOPS, RESULTS_DIR, append_csv, load_note, machine_info, time_fn  # noqa: E402
from metafluence import Task
from metafluence.bilevel import HeadOnly, MetaProblem, Unrolled  # noqa: E402

WAYS, SHOTS, QUERIES = 5, 1, 15


def make_model(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU())
    return nn.Sequential(OrderedDict(body=body, head=nn.Linear(hidden, WAYS)))


def make_tasks(M: int, dtype: torch.dtype) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for i in range(M):
        xs = torch.randn(WAYS * SHOTS, 1, 28, 28, generator=g, dtype=dtype)
        xq = torch.randn(WAYS * QUERIES, 1, 28, 28, generator=g, dtype=dtype)
        ys = torch.arange(WAYS).repeat_interleave(SHOTS)
        yq = torch.arange(WAYS).repeat_interleave(QUERIES)
        tasks.append(Task(support=(xs, ys), query=(xq, yq), id=i))
    return tasks


INNERS = {
    "unrolled1": lambda: Unrolled(steps=1, lr=0.4),
    "headonly_implicit": lambda: HeadOnly("head", reg=1.0, solver="direct"),
}


def run(inner_name, curvature, M, loop_M, chunk, dtype, info, rows, profile):
    model = make_model().to(dtype)
    problem = MetaProblem(model, "cross_entropy", INNERS[inner_name](), chunk_size=chunk)
    lam = problem.flat(problem.init_params())
    tasks = make_tasks(M, dtype)
    P = lam.numel()
    D = torch.randn(2, P, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def batched():
        return problem.point(lam, tasks).hvp(D, curvature)

    w1 = torch.full((1,), 1.0 / M, dtype=dtype)

    # the per-task loop (on the first loop_M tasks), timed once; warm-up: one task
    problem.point(lam, tasks[:1], task_weight=w1).hvp(D, curvature)
    sub = tasks[:loop_M]
    t0 = time.perf_counter()
    ref = torch.zeros_like(D)
    for t in sub:
        ref = ref + problem.point(lam, [t], task_weight=w1).hvp(D, curvature)
    tl = (time.perf_counter() - t0) * (M / loop_M)  # loop time scaled to M tasks
    # correctness: the batched path on the same subset equals the loop
    got = problem.point(lam, sub, task_weight=torch.full((loop_M,), 1.0 / M, dtype=dtype)).hvp(
        D, curvature
    )
    err = float((got - ref).norm() / ref.norm())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert err <= tol, f"{inner_name} {curvature}: batched vs loop rel err {err:.2e} > {tol}"

    tb = time_fn(batched, warmup=1, repeat=3)
    speed = tl / tb["median_s"]
    # rough flop count: forward+backward of the MLP on (support+query) per task, ×~4 for
    # the second-order passes (jvp + vjp of the inner map and of the outer loss), per column
    n_pts = WAYS * (SHOTS + QUERIES)
    flops = M * D.shape[0] * 4 * 3 * 2 * n_pts * P
    row = {
        **info,
        "bench": "total_hvp",
        "inner": inner_name,
        "curvature": curvature,
        "dtype": str(dtype).removeprefix("torch."),
        "M": M,
        "P": P,
        "k": D.shape[0],
        "chunk_size": chunk,
        "loop_tasks_timed": loop_M,
        "batched_ms": round(tb["median_s"] * 1e3, 1),
        "batched_min_ms": round(tb["min_s"] * 1e3, 1),
        "loop_ms": round(tl * 1e3, 1),
        "speedup_vs_loop": round(speed, 2),
        "rel_err_vs_loop": f"{err:.1e}",
        "gflops_est": round(flops / tb["median_s"] / 1e9, 2),
        "pct_peak_flops": round(100 * flops / tb["median_s"] / 1e9 / PEAK_GFLOPS, 1),
        **load_note(torch.get_num_threads()),
    }
    if loop_M < M:
        row["note"] += (
            f"; per-task loop timed once on {loop_M} of {M} tasks, scaled x{M / loop_M:g}"
        )
    else:
        row["note"] += "; per-task loop timed once over all tasks"
    rows.append(row)
    print(
        f"{inner_name:<18} {curvature:<13} M={M} P={P} chunk={chunk}: batched "
        f"{tb['median_s'] * 1e3:8.1f} ms, loop {tl * 1e3:9.1f} ms -> x{speed:6.1f} "
        f"(err {err:.1e}, ~{row['gflops_est']} GFLOP/s)",
        flush=True,
    )
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            batched()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--loop-tasks", type=int, default=1000)
    parser.add_argument("--chunks", default="250")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--curvatures", default="exact,gauss_newton")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "hvp.csv"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    rows: list[dict] = []
    n_rows = 0
    for inner_name in INNERS:
        if args.only and args.only not in inner_name:
            continue
        for curvature in args.curvatures.split(","):
            for chunk in (int(c) for c in args.chunks.split(",")):
                run(
                    inner_name,
                    curvature,
                    args.tasks,
                    min(args.loop_tasks, args.tasks),
                    chunk,
                    dtype,
                    info,
                    rows,
                    args.profile,
                )
                append_csv(args.out, rows)  # row by row: a stopped run keeps what it measured
                n_rows += len(rows)
                rows.clear()
    print(f"appended {n_rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
