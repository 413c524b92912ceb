"""Query-point scores: fused per-sample gradient dots vs the mixed product (issue 4, item 2).

M Omniglot-shaped 5-way 1-shot tasks (15 queries per class, 1×28×28), MLP 784→32→5 (as in
``bench_influence.py``), float32, one chunk of ``--chunk`` tasks at a time. For a fixed s-test
``s`` the query-point scores ``[M, m]`` come from

- ``mixed``: the V-block of ``∇²Φ (s, 0, 0, 0)`` (what ``removal_effects`` does: it also yields
  the task and support scores);
- ``psg``: ``influence.query.query_point_scores(method="psg")`` — one ``theta_jvp`` per chunk and
  ``per_sample_grad_dots`` per task;
- ``jvp``: the same with task-batched forward-mode dots.

The three are checked to agree (rel 1e-4 in float32) before timing; rows go to
``benchmarks/results/query.csv``.

    python benchmarks/bench_query.py [--tasks 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from bench_influence import INNERS, mlp, omniglot_like_tasks  # noqa: E402
from harness import RESULTS_DIR, append_csv, load_note, machine_info, time_fn  # noqa: E402
from metafluence.influence.query import query_point_scores  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--inner", nargs="+", default=list(INNERS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "query.csv"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    torch.manual_seed(0)
    model = mlp(32, 5)
    tasks = omniglot_like_tasks(args.tasks, seed=2)
    rows = []
    for inner_name in args.inner:
        prob = mf.MetaProblem(
            model, inner=INNERS[inner_name](), damping=1e-3, chunk_size=args.chunk
        )
        pt = prob.point(prob.init_params(), tasks)
        g = torch.Generator().manual_seed(1)
        s = torch.randn(prob.spec.size, generator=g) / prob.spec.size**0.5

        def mixed():
            _, _, _, h_v = pt.hvp_all(s)
            return pt.batch.query_weight * h_v

        def fused(method):
            return lambda: torch.cat([query_point_scores(prob, e, s, method) for e in pt.engines])

        ref = mixed()
        times = {}
        for name, fn in (("mixed", mixed), ("psg", fused("psg")), ("jvp", fused("jvp"))):
            err = float((fn() - ref).norm() / ref.norm())
            assert err <= 1e-4, f"{inner_name} {name}: rel err {err:.1e} vs the mixed product"
            times[name] = time_fn(fn, warmup=1, repeat=args.repeat)
            print(
                f"{inner_name:14s} M={args.tasks} {name:6s} "
                f"{times[name]['median_s'] * 1e3:9.1f} ms (err {err:.1e})",
                flush=True,
            )
        for name, t in times.items():
            rows.append(
                {
                    **info,
                    "bench": "query_point_scores",
                    "model": "mlp",
                    "inner": inner_name,
                    "M": args.tasks,
                    "P": prob.spec.size,
                    "chunk_size": args.chunk,
                    "method": name,
                    "median_ms": round(t["median_s"] * 1e3, 1),
                    "min_ms": round(t["min_s"] * 1e3, 1),
                    "speedup_vs_mixed": round(times["mixed"]["median_s"] / t["median_s"], 2),
                    **load_note(torch.get_num_threads()),
                }
            )
    append_csv(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
