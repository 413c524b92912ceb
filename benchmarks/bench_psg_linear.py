"""Benchmark psg_linear: every runnable backend against the einsum baseline.

Checks each backend against the reference before timing, then appends one row per
(shape, dtype, backend) to benchmarks/results/psg_linear.csv.

    python benchmarks/bench_psg_linear.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from harness import RESULTS_DIR, append_csv, machine_info, max_rel_err, time_fn  # noqa: E402
from metafluence.ops import _dispatch  # noqa: E402

# (N, T, in, out): MLP layer (T=1) for a batch of few-shot support sets, a conv-like layer (T>1)
SHAPES = [(25, 1, 64, 64), (256, 1, 256, 128), (64, 16, 64, 64), (97, 5, 512, 10)]
QUICK_SHAPES = [(25, 1, 64, 64), (64, 16, 64, 64)]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two small shapes only")
    parser.add_argument("--out", default=str(RESULTS_DIR / "psg_linear.csv"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = args.device
    info = machine_info(device)
    rows = []
    for n, t, d_in, d_out in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(0)
            a = torch.randn(n, t, d_in, generator=gen, dtype=dtype).to(device)
            g = torch.randn(n, t, d_out, generator=gen, dtype=dtype).to(device)
            ref = torch.einsum("nto,nti->noi", g, a)
            baseline = time_fn(lambda a=a, g=g: torch.einsum("nto,nti->noi", g, a), device=device)
            candidates = {"einsum": None}
            report = _dispatch.backend_report("psg_linear", device, dtype)
            for name, why in report.items():
                if name == "triton" and device == "cpu":
                    why = why or "skipped: Triton interpreter is not a performance target"
                candidates[name] = why
            for name, why in candidates.items():
                if why is not None:
                    print(f"  {name:<9} {n}x{t}x{d_in}x{d_out} {dtype}: {why}")
                    continue
                if name == "einsum":
                    timing, err = baseline, 0.0
                else:

                    def call(a=a, g=g, name=name):
                        return mf.psg_linear(a, g, backend=name)

                    err = max_rel_err(call(), ref)
                    if err > RTOL[dtype]:
                        raise SystemExit(f"{name} wrong on {(n, t, d_in, d_out)}: rel err {err}")
                    timing = time_fn(call, device=device)
                ratio = baseline["median_s"] / timing["median_s"]
                shape = f"{n}x{t}x{d_in}x{d_out}"
                print(
                    f"  {name:<9} {shape:<16} {str(dtype):<14} "
                    f"{timing['median_s'] * 1e3:8.3f} ms  x{ratio:5.2f} vs einsum"
                )
                rows.append(
                    {
                        **info,
                        "op": "psg_linear",
                        "backend": name,
                        "device": device,
                        "dtype": str(dtype).removeprefix("torch."),
                        "N": n,
                        "T": t,
                        "in": d_in,
                        "out": d_out,
                        "median_ms": round(timing["median_s"] * 1e3, 4),
                        "min_ms": round(timing["min_s"] * 1e3, 4),
                        "speedup_vs_einsum": round(ratio, 3),
                        "max_rel_err": f"{err:.2e}",
                    }
                )
    path = append_csv(args.out, rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
