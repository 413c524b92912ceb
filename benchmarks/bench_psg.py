"""Benchmark per-sample gradients, fused dots and norms on Conv-4 (64 filters) + Linear head.

Shapes: 1x28x28 (Omniglot) and 3x84x84 (mini-ImageNet), N = 25 and 80, GroupNorm (per-sample
gradients are then unambiguous). Rows (medians of repeated runs, all in the same run as the
baseline ``fwd_bwd`` = one ordinary batched forward + backward of the summed loss):
``psg`` (mf.per_sample_grads), ``func_vmap`` (torch.func vmap(grad)), ``opacus``
(GradSampleModule, if installed), ``dots`` (m = 4 vectors), ``norms``. Each candidate is checked
against vmap(grad) before timing. GFLOP/s counts 3x the forward conv/linear flops (forward, input
gradient, weight gradient) against this machine's ~130 GFLOP/s fp32 matmul rate.

    python benchmarks/bench_psg.py [--quick] [--repeat 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    PEAK_GFLOPS,
    RESULTS_DIR,
    append_csv,
    load_note,
    machine_info,
    time_fn,
)


def conv4(c_in: int, size: int, classes: int = 5, filters: int = 64) -> nn.Sequential:
    layers: list[nn.Module] = []
    c, s = c_in, size
    for _ in range(4):
        layers += [nn.Conv2d(c, filters, 3, padding=1), nn.GroupNorm(4, filters), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        c, s = filters, s // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * s * s, classes))


def fwd_flops(model: nn.Module, x: torch.Tensor) -> float:
    flops = 0.0

    def hook(mod, inp, out):
        nonlocal flops
        if isinstance(mod, nn.Conv2d):
            flops += 2.0 * out.numel() * mod.weight[0].numel()
        elif isinstance(mod, nn.Linear):
            flops += 2.0 * out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return flops


def bench_config(
    c_in: int, size: int, n: int, repeat: int, info: dict, GradSampleModule
) -> list[dict]:  # noqa: N803
    from bench_psg_conv import _candidates, make_problem  # (it imports conv4 from here)

    rows: list[dict] = []
    model, _, x, _, _ = make_problem("conv4", c_in, size, n)
    flops = 3.0 * fwd_flops(model, x)
    cands, _ = _candidates("conv4", c_in, size, n)
    if GradSampleModule is None:
        cands.pop("opacus", None)
    errs = {}
    for name, (fn, check) in cands.items():
        errs[name] = check(fn()) if check is not None else 0.0
        if errs[name] > 1e-4:
            raise SystemExit(f"{name} wrong at {(c_in, size, n)}: rel err {errs[name]:.2e}")
    # interleave rounds so that machine noise hits every candidate alike; median of rounds
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeat):
        for name, (fn, _) in cands.items():
            times[name].append(time_fn(fn, warmup=1, repeat=1)["median_s"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for name in cands:
        ratio = med[name] / med["fwd_bwd"]
        gflops = flops / med[name] / 1e9
        print(
            f"{c_in}x{size}x{size} N={n:<3} {name:<9} {med[name] * 1e3:9.1f} ms  "
            f"x{ratio:5.2f} vs fwd_bwd  {gflops:6.1f} GFLOP/s  err {errs[name]:.1e}"
        )
        rows.append(
            {
                **info,
                "bench": "psg_conv4",
                "input": f"{c_in}x{size}x{size}",
                "N": n,
                "method": name,
                "median_ms": round(med[name] * 1e3, 3),
                "min_ms": round(min(times[name]) * 1e3, 3),
                "ratio_vs_fwd_bwd": round(ratio, 3),
                "gflops_3x_fwd": round(gflops, 2),
                "frac_of_peak": round(gflops / PEAK_GFLOPS, 3),
                "max_rel_err": f"{errs[name]:.2e}",
                "repeats": repeat,
                **load_note(torch.get_num_threads()),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--configs", default="", help="e.g. 1x28x25,3x84x80 (c_in x size x N)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "psg.csv"))
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        from opacus import GradSampleModule
    except ImportError:  # optional
        GradSampleModule = None  # noqa: N806
    info = machine_info("cpu")
    configs = [(1, 28, 25), (1, 28, 80), (3, 84, 25), (3, 84, 80)]
    if args.quick:
        configs = [(1, 28, 25)]
    if args.configs:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    n_rows = 0
    for c_in, size, n in configs:
        rows = bench_config(c_in, size, n, args.repeat, info, GradSampleModule)
        append_csv(args.out, rows)  # per config: a stopped run keeps what it measured
        n_rows += len(rows)
    print(f"appended {n_rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
