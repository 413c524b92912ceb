"""Benchmark the inner / total solvers (issue 4 items 3-4).

A. Inner solve of 5-way 1-shot tasks, ``(γI + U Uᵀ) x = v`` with ``U [M, P, r]``, ``r = n·C = 25``
   (per-sample logit Jacobians of a few-thousand-parameter head): ``solve_woodbury_batched``
   (factor + solve, and solve-only with a cached Cholesky factor as the influence core does)
   against task-batched CG (rows = tasks, ``A`` as a batched matvec) to rel 1e-6, float64.
B. Per-iteration cost of multi-column CG at P = 1e4, 1e5 and k = 1, 16, 256 columns with a
   diagonal matvec: fused vector updates (``ops.cg_update_`` + ``ops.cg_direction_``) against the
   plain-PyTorch loop, reported as time, GB/s (vs ~26 GB/s copy) and GFLOP/s (vs ~130).

    python benchmarks/bench_solvers.py [--quick] [--tasks M] [--threads 1] [--sizes 2000,5000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import COPY_GBS, PEAK_GFLOPS, RESULTS_DIR, append_csv, load_note, machine_info, time_fn  # noqa: E402
from metafluence.ops import solver_update  # noqa: E402
from metafluence.solvers import solve_cg, solve_woodbury_batched  # noqa: E402


def inner_problem(M: int, P: int, r: int, dtype: torch.dtype, seed: int = 0):
    """Random tall-skinny U per task with the spectrum of softmax-weighted logit Jacobians:
    singular values spread over ~2 decades (σ² from ~1e-2 to ~10 times γ = 1e-2... 1)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(M, P, r, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(-1, 1, r, dtype=torch.float64) * (1 + 0.1 * torch.rand(M, r, generator=g))
    W = torch.linalg.qr(torch.randn(M, r, r, generator=g, dtype=torch.float64)).Q
    U = (Q * s[:, None, :]) @ W  # [M, P, r], singular values s
    v = torch.randn(M, P, generator=g, dtype=torch.float64)
    return U.to(dtype), v.to(dtype)


def bench_inner(M: int, P: int, r: int, gamma: float, info: dict, rows: list) -> None:
    dt = torch.float64
    U, v = inner_problem(M, P, r, dt)
    Ut = U.transpose(1, 2).contiguous()

    def mv(X):  # rows = tasks: (γ I + U Uᵀ) x_m   (γ added by the solver's damping)
        return torch.bmm(U, torch.bmm(Ut, X.unsqueeze(-1))).squeeze(-1)

    def wood():
        return solve_woodbury_batched(U, v, gamma).x

    eye = torch.eye(r, dtype=dt)
    L = torch.linalg.cholesky(torch.bmm(Ut, U) + gamma * eye)

    def wood_cached():  # the influence core caches (U, chol) per inner point
        y = torch.cholesky_solve(torch.bmm(Ut, v.unsqueeze(-1)), L)
        return (v - torch.bmm(U, y).squeeze(-1)) / gamma

    def cg(fused):
        return solve_cg(
            mv, v, damping=gamma, rtol=1e-6, maxiter=500, check_every=5, shrink=False, fused=fused
        )

    ref = (
        torch.linalg.solve(torch.bmm(U, Ut) + gamma * torch.eye(P, dtype=dt), v)
        if P <= 3000
        else None
    )
    res = cg(None)
    assert res.converged, res.residual.max()
    x_w = wood()
    for name, x in (("woodbury", x_w), ("woodbury_cached", wood_cached()), ("cg", res.x)):
        if ref is not None:
            err = float(((x - ref).norm(dim=1) / ref.norm(dim=1)).max())
            assert err < 1e-4, (name, err)
    resid = lambda x: float(  # noqa: E731
        ((v - gamma * x - mv(x)).norm(dim=1) / v.norm(dim=1)).max()
    )
    t = {
        "woodbury": time_fn(wood, repeat=7),
        "woodbury_cached": time_fn(wood_cached, repeat=7),
        "cg_fused": time_fn(lambda: cg(None), warmup=1, repeat=5),
        "cg_plain": time_fn(lambda: cg(False), warmup=1, repeat=5),
    }
    base = t["cg_fused"]["median_s"]
    iters = res.iters
    flops = {  # leading terms
        "woodbury": M * (2 * P * r * r + 4 * P * r + r**3 / 3),
        "woodbury_cached": M * 4 * P * r,
        "cg_fused": M * iters * (4 * P * r + 14 * P),
        "cg_plain": M * iters * (4 * P * r + 14 * P),
    }
    bytes_ = {"woodbury": M * P * r * 8 * 2, "woodbury_cached": M * P * r * 8 * 2}
    for name, tm in t.items():
        x = {"woodbury": x_w, "woodbury_cached": wood_cached()}.get(name, res.x)
        b = bytes_.get(name, M * iters * (2 * P * r * 8 + 14 * P * 8))
        med = tm["median_s"]
        row = {
            **info,
            "bench": "inner_solve",
            "method": name,
            "dtype": "float64",
            "M": M,
            "P": P,
            "r": r,
            "k": 1,
            "cg_iters": iters,
            "median_ms": round(med * 1e3, 3),
            "min_ms": round(tm["min_s"] * 1e3, 3),
            "speedup_vs_cg_fused": round(base / med, 2),
            "rel_residual": f"{resid(x):.2e}",
            "gflops": round(flops[name] / med / 1e9, 2),
            "gbs": round(b / med / 1e9, 2),
            "pct_peak_flops": round(100 * flops[name] / med / 1e9 / PEAK_GFLOPS, 1),
            "pct_copy_bw": round(100 * b / med / 1e9 / COPY_GBS, 1),
            **load_note(torch.get_num_threads()),
        }
        rows.append(row)
        print(
            f"inner M={M} P={P} r={r} {name:<16} {med * 1e3:9.2f} ms  x{base / med:7.2f} vs cg  "
            f"res {row['rel_residual']}  {row['gflops']:6.2f} GFLOP/s {row['gbs']:6.2f} GB/s"
        )


def bench_update(k: int, P: int, iters: int, info: dict, rows: list) -> None:
    dt = torch.float32
    g = torch.Generator().manual_seed(1)
    d = torch.rand(P, generator=g, dtype=dt) + 1.0
    B = torch.randn(k, P, generator=g, dtype=dt)

    def mv(X):
        return X * d

    def run(fused):
        return solve_cg(mv, B, rtol=0.0, maxiter=iters, check_every=iters, fused=fused)

    a, b = run(True), run(False)
    err = float((a.x - b.x).abs().max() / b.x.abs().max())
    assert err < 1e-4, err
    # median over interleaved rounds (noisy shared machine)
    times = {"fused": [], "plain": [], "matvec": []}
    W = torch.empty(k, P, dtype=dt)
    for _ in range(5):
        times["fused"].append(time_fn(lambda: run(True), warmup=1, repeat=3)["median_s"])
        times["plain"].append(time_fn(lambda: run(False), warmup=1, repeat=3)["median_s"])
        times["matvec"].append(
            time_fn(lambda: torch.mul(B, d, out=W), warmup=1, repeat=10)["median_s"]
        )
    med = {n: sorted(v)[len(v) // 2] for n, v in times.items()}
    mvt = med["matvec"]
    # fused update traffic per iteration: cg_update_ reads p, Ap, then x, p, r, Ap and writes x, r;
    # cg_direction_ reads r, p and writes p: 11 vectors. Flops: 12 per element.
    vec_bytes = k * P * 4
    for name in ("fused", "plain"):
        per_it = med[name] / iters
        upd = max(per_it - mvt, 1e-12)
        row = {
            **info,
            "bench": "cg_iteration",
            "method": name,
            "dtype": "float32",
            "M": 1,
            "P": P,
            "r": "",
            "k": k,
            "cg_iters": iters,
            "median_ms": round(per_it * 1e3, 4),
            "update_ms": round(upd * 1e3, 4),
            "matvec_ms": round(mvt * 1e3, 4),
            "speedup_vs_plain": round(med["plain"] / med[name], 2),
            "gbs": round(11 * vec_bytes / upd / 1e9, 2),
            "gflops": round(12 * k * P / upd / 1e9, 2),
            "pct_copy_bw": round(100 * 11 * vec_bytes / upd / 1e9 / COPY_GBS, 1),
            "pct_peak_flops": round(100 * 12 * k * P / upd / 1e9 / PEAK_GFLOPS, 1),
            "backend": solver_update.fused_backend(torch.device("cpu"), dt)
            if name == "fused"
            else "plain",
            **load_note(torch.get_num_threads()),
        }
        rows.append(row)
        print(
            f"cg iter k={k:<4} P={P:<7} {name:<6} {per_it * 1e3:8.3f} ms/iter "
            f"(update {upd * 1e3:8.3f}, matvec {mvt * 1e3:7.3f})  x{row['speedup_vs_plain']:5.2f}"
            f"  update {row['gbs']:6.2f} GB/s {row['gflops']:5.2f} GFLOP/s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--sizes", default="", help="inner-solve P values, e.g. 2000,5000")
    parser.add_argument("--out", default=str(RESULTS_DIR / "solvers.csv"))
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    rows: list[dict] = []
    sizes = [int(p) for p in args.sizes.split(",")] if args.sizes else None
    for P in sizes or ((2000,) if args.quick else (2000, 5000)):
        bench_inner(args.tasks, P, 25, 1e-2, info, rows)
        append_csv(args.out, rows)
        rows.clear()
    grid = (
        [(1, 10_000), (16, 10_000)]
        if args.quick
        else [(k, P) for P in (10_000, 100_000) for k in (1, 16, 256)]
    )
    for k, P in grid:
        bench_update(k, P, 20 if k * P >= 1_000_000 else 100, info, rows)
        append_csv(args.out, rows)  # row by row: a stopped run keeps what it measured
        rows.clear()
    print(f"appended rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
