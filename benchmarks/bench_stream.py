"""Streaming influence over M = 10³, 10⁴, 10⁵ glyph tasks: peak memory and time per task.

The tasks are a lazy :class:`metafluence.data.TaskDataset` over the default glyph set
(``load_glyphs()``, 5-way 1-shot, ``--queries`` queries per class, float32): task ``i`` is drawn
when read, so the ``M`` tasks never sit in memory as tensors at once. Each M runs in a *fresh
subprocess* (so ``ru_maxrss`` is that run's own peak) that

1. imports metafluence and loads the glyph pool → ``rss_dataset_mb`` (the "dataset itself"
   baseline: interpreter + torch + the image pool);
2. wraps the dataset in a ``TaskSource`` (one validating pass over all tasks);
3. calls ``mf.removal_effects(items="task")`` with an ANIL map (``HeadOnly``, 1 unrolled step)
   on an MLP ``784 → --width → 5`` at its initialisation, ``chunk_size`` tasks per chunk, CG
   with ``--maxiter`` iterations on the Gauss-Newton curvature (PSD: the exact Hessian at an
   untrained λ is indefinite), ``diagnostics=False``, against ``--targets`` val tasks.

Recorded per M: wall time of the source and of ``removal_effects``, time per task, peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``), RSS after loading the dataset, RSS beyond the dataset
(peak − baseline), the number of passes over the tasks (dataset reads / M) and the memory the M
stacked tasks would take (``stacked_mb``). Target (issue #7): peak RSS ≤ 2 GB beyond the dataset
at M = 10⁵, time linear in M. Appends rows to ``benchmarks/results/stream.csv``; ``--plot``
writes ``stream.png`` (time/task and RSS vs M) from the last CSV row of each M.

    python benchmarks/bench_stream.py [--tasks 1000 10000 100000] [--chunk 500] [--plot]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def rss_mb() -> float:
    """Current resident set size (``VmRSS``) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class CountingTasks:
    """A dataset wrapper counting reads (``passes = reads / M``) and the longest in-order run."""

    def __init__(self, ds: Any) -> None:
        self.ds, self.reads, self._last, self._run, self.longest_run = ds, 0, -2, 0, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        self.reads += 1
        self._run = self._run + 1 if i == self._last + 1 else 1
        self.longest_run = max(self.longest_run, self._run)
        self._last = i
        return self.ds[i]


def run_one(args: argparse.Namespace, M: int) -> dict[str, Any]:
    """One measurement (meant to run in a fresh process)."""
    import torch

    torch.set_num_threads(1)
    import metafluence as mf
    from metafluence.data.source import TaskSource
    from metafluence.models import MLP

    glyphs = mf.data.load_glyphs()
    rss_data = rss_mb()
    peak_before = peak_rss_mb()
    ds = mf.data.TaskDataset(
        glyphs, "train", num_tasks=M, ways=args.ways, shots=1, queries=args.queries, seed=0
    )
    counted = CountingTasks(ds)
    target = mf.data.sample_tasks(
        glyphs, ways=args.ways, shots=1, queries=args.queries, num_tasks=args.targets, split="val"
    )
    torch.manual_seed(0)
    model = MLP(784, ways=args.ways, hidden=(args.width,))
    prob = mf.MetaProblem(
        model, inner=mf.inner.HeadOnly(head="head", steps=1, lr=0.5), chunk_size=args.chunk
    )
    lam = prob.init_params()

    t0 = time.perf_counter()
    src = TaskSource(counted)
    t_src = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = mf.removal_effects(
        prob,
        lam,
        src,
        target=target,
        items="task",
        curvature=args.curvature,
        solver="cg",
        solver_kwargs={"maxiter": args.maxiter, "rtol": 0.0},
        solve_damping=0.1,
        diagnostics=False,
    )
    t_inf = time.perf_counter() - t0
    scores = res.all_scores["task"]
    assert scores.shape == (M,) and bool(torch.isfinite(scores).all())
    peak = peak_rss_mb()
    n, m = args.ways, args.ways * args.queries
    stacked = M * (n + m) * (784 * 4 + 8) / 2**20
    return {
        "M": M,
        "chunk_size": args.chunk,
        "ways": args.ways,
        "queries": args.queries,
        "width": args.width,
        "curvature": args.curvature,
        "cg_maxiter": args.maxiter,
        "dataset_mb": round(glyphs.images.nbytes / 2**20, 2),
        "stacked_mb": round(stacked, 1),
        "rss_dataset_mb": round(rss_data, 1),
        "peak_before_mb": round(peak_before, 1),
        "peak_rss_mb": round(peak, 1),
        "beyond_dataset_mb": round(peak - rss_data, 1),
        "source_s": round(t_src, 2),
        "influence_s": round(t_inf, 2),
        "total_s": round(t_src + t_inf, 2),
        "ms_per_task": round(1e3 * (t_src + t_inf) / M, 3),
        "passes": round(counted.reads / M, 2),
        "longest_run": counted.longest_run,
        "score_abs_mean": float(scores.abs().mean()),
    }


def plot(csv_path: Path, out: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    latest = {int(r["M"]): r for r in rows}  # the last row of each M
    rows = [latest[M] for M in sorted(latest)]
    Ms = [int(r["M"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(Ms, [float(r["ms_per_task"]) for r in rows], "o-")
    ax[0].set(xscale="log", xlabel="M tasks", ylabel="ms / task", title="time per task")
    ax[0].set_ylim(bottom=0)
    ax[1].plot(Ms, [float(r["peak_rss_mb"]) for r in rows], "o-", label="peak RSS")
    ax[1].plot(Ms, [float(r["beyond_dataset_mb"]) for r in rows], "s-", label="beyond dataset")
    ax[1].plot(Ms, [float(r["stacked_mb"]) for r in rows], "k:", label="M tasks stacked")
    ax[1].axhline(2048, color="r", lw=0.8, ls="--", label="2 GB target")
    ax[1].set(xscale="log", yscale="log", xlabel="M tasks", ylabel="MiB", title="memory")
    ax[1].legend(fontsize=7)
    when = ", ".join(sorted({r["date"][:16] for r in rows}))
    fig.suptitle(f"streamed removal_effects, glyph tasks ({when})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--queries", type=int, default=5)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--curvature", default="gauss_newton")
    ap.add_argument("--maxiter", type=int, default=5)
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: measure this M
    ap.add_argument("--out", default=str(HERE / "results" / "stream.csv"))
    ap.add_argument("--plot", action="store_true", help="also write results/stream.png")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return
    from harness import append_csv, load_note, machine_info

    if not args.plot_only:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for M in args.tasks:
            cmd = [sys.executable, __file__, "--one", str(M)]
            cmd += ["--chunk", str(args.chunk), "--ways", str(args.ways)]
            cmd += ["--queries", str(args.queries), "--width", str(args.width)]
            cmd += ["--maxiter", str(args.maxiter), "--targets", str(args.targets)]
            cmd += ["--curvature", args.curvature]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"M={M}: child failed with exit code {proc.returncode}")
            row = {**json.loads(lines[-1][7:]), **machine_info(), **load_note(1)}
            row["threads"] = 1
            append_csv(args.out, [row])
            print(
                f"M={M:>7}  {row['total_s']:8.1f} s  {row['ms_per_task']:7.3f} ms/task  "
                f"peak {row['peak_rss_mb']:7.1f} MiB  beyond dataset "
                f"{row['beyond_dataset_mb']:7.1f} MiB  passes {row['passes']}",
                flush=True,
            )
    if args.plot or args.plot_only:
        plot(Path(args.out), Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
