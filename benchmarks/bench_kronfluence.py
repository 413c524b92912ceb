"""kronfluence's per-module hot spots: kronfluence's own einsum vs metafluence's paths.

For ``TrackedLinear`` and ``TrackedConv2d`` at kronfluence-like shapes, each of the three
functions the adapter can replace (per-sample gradient, pairwise score, self score) is timed on

* ``kronfluence``: the unpatched ``Tracked*.compute_*`` method (its ``opt_einsum`` path);
* ``native``: metafluence's compiled kernel (:mod:`metafluence.ops`);
* ``reference``: metafluence's pure-PyTorch twin of that kernel;
* ``einsum``: the adapter's one ``torch.einsum`` contraction (kronfluence's formula).

Every path is checked against kronfluence in float64 (relative error <= 1e-10) before timing.
Rounds are interleaved (each round times every path once, so machine noise hits all alike); a
row reports the median over rounds of the path's time and of its per-round ratio to
``kronfluence``. ``DEFAULT_BACKEND`` in :mod:`metafluence.integrations.kronfluence` is the
fastest metafluence path per (layer, function) in these rows; the column ``default`` marks it.

    python benchmarks/bench_kronfluence.py [--threads 1] [--rounds 9] [--configs NAME,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR, append_csv, load_note, machine_info  # noqa: E402
from metafluence.integrations import kronfluence as mk  # noqa: E402

PATHS = ("kronfluence", "native", "reference", "einsum")
FUNCTIONS = ("per_sample_gradient", "pairwise_score", "self_score")

# (name, layer, shape): linear {B, T, in, out, Q}, conv2d {B, C, O, H, k, Q}
CONFIGS: list[tuple[str, str, dict[str, int]]] = [
    ("mlp-784x256", "linear", {"B": 64, "T": 1, "in": 784, "out": 256, "Q": 16}),
    ("mlp-256x10", "linear", {"B": 256, "T": 1, "in": 256, "out": 10, "Q": 32}),
    ("tokens-128x256x256", "linear", {"B": 8, "T": 128, "in": 256, "out": 256, "Q": 8}),
    ("conv-32x64-16px", "conv2d", {"B": 32, "C": 32, "O": 64, "H": 16, "k": 3, "Q": 8}),
    ("conv-1x32-28px", "conv2d", {"B": 64, "C": 1, "O": 32, "H": 28, "k": 3, "Q": 16}),
]


def _inputs(layer: str, s: dict[str, int], dtype: torch.dtype, seed: int = 0):
    """``(tracked module, activations, output gradients, P [Q, out, in'], P_self [B, out,
    in'])``."""
    from kronfluence.module.conv2d import TrackedConv2d
    from kronfluence.module.linear import TrackedLinear

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    if layer == "linear":
        mod = torch.nn.Linear(s["in"], s["out"]).to(dtype)
        tracked = TrackedLinear(name="fc", original_module=mod)
        lead = (s["B"],) if s["T"] == 1 else (s["B"], s["T"])
        a, go = rnd(*lead, s["in"]), rnd(*lead, s["out"])
        n_in, n_out = s["in"] + 1, s["out"]
    else:
        mod = torch.nn.Conv2d(s["C"], s["O"], s["k"], padding=s["k"] // 2).to(dtype)
        tracked = TrackedConv2d(name="conv", original_module=mod)
        a, go = rnd(s["B"], s["C"], s["H"], s["H"]), rnd(s["B"], s["O"], s["H"], s["H"])
        n_in, n_out = s["C"] * s["k"] * s["k"] + 1, s["O"]
    return tracked, a, go, rnd(s["Q"], n_out, n_in), rnd(s["B"], n_out, n_in)


def _calls(layer: str, tracked: Any, a, go, pg, pg_self) -> dict[tuple[str, str], Callable]:
    """``(function, path) -> zero-argument call``."""
    from kronfluence.module.conv2d import TrackedConv2d
    from kronfluence.module.linear import TrackedLinear

    cls = TrackedLinear if layer == "linear" else TrackedConv2d

    def kron(method: str, *args: Any) -> Callable:
        def call() -> torch.Tensor:
            tracked.einsum_path = None  # kronfluence caches a path per module: one shape here
            return getattr(cls, method)(tracked, *args)

        return call

    calls: dict[tuple[str, str], Callable] = {
        ("per_sample_gradient", "kronfluence"): kron("compute_per_sample_gradient", a, go),
        ("pairwise_score", "kronfluence"): kron("compute_pairwise_score", pg, a, go),
        ("self_score", "kronfluence"): kron("compute_self_measurement_score", pg_self, a, go),
    }
    mod = tracked.original_module
    for path in PATHS[1:]:
        if layer == "linear":
            aa = tracked._flatten_input_activation(input_activation=a)
            calls[("per_sample_gradient", path)] = lambda p=path, x=aa: mk.per_sample_gradient(
                x, go, backend=p
            )
            calls[("pairwise_score", path)] = lambda p=path, x=aa: mk.pairwise_score(
                pg, x, go, backend=p
            )
            calls[("self_score", path)] = lambda p=path, x=aa: mk.self_score(
                pg_self, x, go, backend=p
            )
        else:
            calls[("per_sample_gradient", path)] = lambda p=path: mk.conv2d_per_sample_gradient(
                mod, a, go, backend=p
            )
            calls[("pairwise_score", path)] = lambda p=path: mk.conv2d_pairwise_score(
                mod, pg, a, go, backend=p
            )
            calls[("self_score", path)] = lambda p=path: mk.conv2d_self_score(
                mod, pg_self, a, go, backend=p
            )
    return calls


def check(layer: str, s: dict[str, int]) -> None:
    """Every path equals kronfluence's in float64 on a small version of the shape."""
    small = {k: (min(v, 6) if k in ("B", "Q", "T") else v) for k, v in s.items()}
    calls = _calls(layer, *_inputs(layer, small, torch.float64))
    for fn in FUNCTIONS:
        ref = calls[(fn, "kronfluence")]()
        for path in PATHS[1:]:
            out = calls[(fn, path)]()
            err = float((out - ref).norm() / ref.norm())
            if err > 1e-10:
                msg = f"{layer} {fn} {path}: relative error {err:.2e} vs kronfluence"
                raise AssertionError(msg)


def measure(layer: str, s: dict[str, int], rounds: int) -> dict[tuple[str, str], list[float]]:
    calls = _calls(layer, *_inputs(layer, s, torch.float32))
    for call in calls.values():  # warm-up (and kronfluence's contract_path search)
        call()
        call()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=str(RESULTS_DIR / "kronfluence.csv"))
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = set(args.configs.split(","))
    import kronfluence
    import opt_einsum

    rows = []
    for name, layer, s in CONFIGS:
        if name not in wanted:
            continue
        check(layer, s)
        times = measure(layer, s, args.rounds)
        info = {
            **machine_info(),
            **load_note(args.threads),
            "kronfluence": kronfluence.__version__,
            "opt_einsum": opt_einsum.__version__,
        }
        for fn in FUNCTIONS:
            base = times[(fn, "kronfluence")]
            medians = {p: statistics.median(times[(fn, p)]) for p in PATHS}
            fastest = min(PATHS[1:], key=lambda p: medians[p])
            for path in PATHS:
                ratios = [t / b for t, b in zip(times[(fn, path)], base, strict=True)]
                rows.append(
                    {
                        **info,
                        "config": name,
                        "layer": layer,
                        "shape": " ".join(f"{k}={v}" for k, v in s.items()),
                        "dtype": "float32",
                        "function": fn,
                        "path": path,
                        "rounds": args.rounds,
                        "median_ms": round(medians[path] * 1e3, 3),
                        "min_ms": round(min(times[(fn, path)]) * 1e3, 3),
                        "ratio_vs_kronfluence": round(statistics.median(ratios), 3),
                        "fastest_of_ours": path == fastest,
                        "default": path == mk.DEFAULT_BACKEND[(layer, fn)],
                    }
                )
                print(
                    f"{name:20s} {fn:20s} {path:12s} {medians[path] * 1e3:9.2f} ms  "
                    f"x{statistics.median(ratios):.2f}{'  *' if path == fastest else ''}"
                )
    append_csv(args.out, rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
