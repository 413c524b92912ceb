"""Per-sample gradients, fused dots and norms of convolutional nets against one batched
forward + backward, torch.func vmap and opacus (issue 19).

Models (GroupNorm, so per-sample gradients are unambiguous): ``conv4`` (Conv-4, 64 filters, the
few-shot backbone) and ``res12`` (one ResNet-12 residual block, 64 filters: three 3x3 convs with
GroupNorm + LeakyReLU, a 1x1 conv shortcut, 2x2 max-pool, then global average pool and a linear
head). Inputs 1x28x28 (Omniglot) and 3x84x84 (mini-ImageNet), N in {25, 80, 256}.

Methods, timed in the same run: ``fwd_bwd`` (the baseline: one ordinary batched forward and backward
of the summed loss, parameter gradients), ``psg`` (``mf.per_sample_grads``), ``dots``
(``mf.per_sample_grad_dots``, m = 4 vectors), ``norms`` (``mf.per_sample_grad_norms``),
``func_vmap`` (``torch.func`` vmap(grad)) and ``opacus`` (GradSampleModule). Every method is checked
against vmap(grad) before timing: in float64 on 4 samples (relative error <= 1e-9), and in float32
on the timed batch (<= 5e-2, recorded: batched and per-sample float32 forwards can resolve near-ties
of max-pool and LeakyReLU differently, which moves a sample's gradient). Rounds are interleaved
(each round times every method once, so machine noise hits all alike); each round gives each
method's ratio to that round's ``fwd_bwd``; a row reports the median (and min / max) of the per-
round ratios. On a shared machine the wall clock of a call includes time other processes held the
cores; the column ``cpu_ratio_median`` gives the same median ratio from this process's CPU time (a
second view, robust to time-slicing at 1 thread; with 2 threads it also counts OpenMP spin-waits).

Targets (median ratio): psg <= 1.3, dots and norms <= 1.15; each of ours faster than the faster
of vmap and opacus, and >= 1.5x faster wherever that peer costs >= 1.8x fwd_bwd. The columns
``target``, ``peer_ratio``, ``speedup_vs_peer`` and ``met`` say how each row fares.

    python benchmarks/bench_psg_conv.py [--threads 1,2] [--models conv4,res12]
        [--inputs 1x28x28,3x84x84] [--ns 25,80,256] [--rounds 5] [--plot-only]

``--roofline`` times the ops themselves instead, on every conv layer of the models (its
activations and grad_outputs from one batched backward): ``psg_conv2d`` (native and Triton) and
the native ``psg_conv2d_sqnorm`` / ``psg_conv2d_dot``, against the machine's two ceilings,
measured in the same run: a large device-to-device copy (bytes read + written per second) and a
float32 matrix product (no TF32). Per op: the fewest bytes it must move (activations and
grad_outputs read once; ``G`` ``[N, P]`` written once by ``psg_conv2d``, nothing that size by
the reductions) and its multiply-adds give the floor ``max(bytes / copy rate, flops / matmul
rate)``; a row reports GB/s, the share of the copy rate, and the share of the floor reached
(the target for per-sample gradients on a GPU: >= 50% of the memory roofline where the bytes
bound them). Rows go to ``psg_conv_roofline.csv`` unless ``--out`` names another file.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from bench_psg import conv4  # noqa: E402
from harness import (  # noqa: E402
    RESULTS_DIR,
    append_csv,
    load_note,
    machine_info,
    max_rel_err,
    time_fn,
)
from metafluence.ops._dispatch import BackendUnavailableError  # noqa: E402
from metafluence.psg.rules import conv2d_geometry  # noqa: E402

OURS = ("psg", "dots", "norms")
PEERS = ("func_vmap", "opacus")
TARGET = {"psg": 1.3, "dots": 1.15, "norms": 1.15}
M_VECTORS = 4


class ResBlock(nn.Module):
    """ResNet-12 residual block (GroupNorm in place of BatchNorm)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, c_out)
        self.conv3 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn3 = nn.GroupNorm(4, c_out)
        self.short = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.gn_s = nn.GroupNorm(4, c_out)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gn1(self.conv1(x)))
        h = self.act(self.gn2(self.conv2(h)))
        h = self.gn3(self.conv3(h))
        return self.pool(self.act(h + self.gn_s(self.short(x))))


def res12(c_in: int, size: int, classes: int = 5, filters: int = 64) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(c_in, filters), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(filters, classes)
    )


MODELS: dict[str, Callable[[int, int], nn.Module]] = {"conv4": conv4, "res12": res12}


def make_problem(
    name: str,
    c_in: int,
    size: int,
    n: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Seeded model, its parameters, inputs ``[N, c_in, size, size]``, labels and ``m`` vectors."""
    torch.manual_seed(0)
    model = MODELS[name](c_in, size).to(dtype).to(device)
    params = dict(model.named_parameters())
    x = torch.randn(n, c_in, size, size, dtype=dtype).to(device)
    y = torch.randint(0, 5, (n,)).to(device)
    vectors = {
        k: torch.randn(M_VECTORS, *p.shape, dtype=dtype).to(device) for k, p in params.items()
    }
    return model, params, x, y, vectors


def _candidates(
    name: str,
    c_in: int,
    size: int,
    n: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[dict[str, tuple[Callable[[], Any], Callable[[Any], float] | None]], int]:
    """``{method: (call, check)}``: ``check(out)`` is the max-norm relative error of the output
    against ``torch.func`` vmap(grad) (computed here once)."""
    model, params, x, y, vectors = make_problem(name, c_in, size, n, dtype, device)

    def fwd_bwd() -> Any:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        return torch.autograd.grad(loss, list(params.values()))

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    pd = {k: v.detach() for k, v in params.items()}
    func = vmap(grad(one), in_dims=(None, 0, 0))
    ref = func(pd, x, y)
    ref_flat = torch.cat([ref[k].reshape(n, -1) for k in params], 1)
    vflat = torch.cat([vectors[k].reshape(M_VECTORS, -1) for k in params], 1)

    def psg_err(out: dict[str, torch.Tensor]) -> float:
        return max(max_rel_err(out[k], ref[k]) for k in params)

    cands: dict[str, tuple[Callable[[], Any], Callable[[Any], float] | None]] = {
        "fwd_bwd": (fwd_bwd, None),
        "psg": (lambda: mf.per_sample_grads(model, params, x, y), psg_err),
        "dots": (
            lambda: mf.per_sample_grad_dots(model, params, x, y, vectors),
            lambda out: max_rel_err(out, ref_flat @ vflat.T),
        ),
        "norms": (
            lambda: mf.per_sample_grad_norms(model, params, x, y),
            lambda out: max_rel_err(out, ref_flat.pow(2).sum(1)),
        ),
        "func_vmap": (lambda: func(pd, x, y), None),
    }
    try:
        from opacus import GradSampleModule
    except ImportError:  # optional peer
        GradSampleModule = None  # noqa: N806
    if GradSampleModule is not None:
        gsm = GradSampleModule(MODELS[name](c_in, size).to(dtype).to(device), loss_reduction="sum")
        gsm._module.load_state_dict(model.state_dict())

        def opacus_call() -> dict[str, torch.Tensor]:
            gsm.zero_grad(set_to_none=True)
            for p in gsm.parameters():
                p.grad_sample = None
            nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
            return {k: p.grad_sample for k, p in gsm._module.named_parameters()}

        cands["opacus"] = (opacus_call, psg_err)
    n_params = sum(p.numel() for p in params.values())
    return cands, n_params


def bench_config(
    name: str,
    c_in: int,
    size: int,
    n: int,
    rounds: int,
    info: dict[str, Any],
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Rows for one configuration. CPU: wall clock per call; CUDA: wall clock around the call
    and a device synchronisation (each call is large enough for that to be the kernel time)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # correctness first: float64 on 4 samples (exact up to rounding), then the timed float32 run.
    # In float32 the batched forward (ours, opacus) and vmap's per-sample forwards round
    # differently, and a near-tie of max-pool or a LeakyReLU input near 0 can then go either way
    # for a sample: measured at res12 1x28x28 N=256, one sample's gradient differed by 3e-3
    # (relative) from vmap while matching autograd of the batched float32 forward to 2e-7. So
    # the float32 bound only catches gross errors; the error is recorded in max_rel_err.
    for tol, dtype, n_check in ((1e-9, torch.float64, min(n, 4)), (5e-2, torch.float32, n)):
        cands, n_params = _candidates(name, c_in, size, n_check, dtype, device)
        errs: dict[str, float] = {}
        for method, (fn, check) in cands.items():  # (the float32 pass is also the warm-up)
            errs[method] = check(fn()) if check is not None else 0.0
            if errs[method] > tol:
                raise SystemExit(
                    f"{method} wrong at {name} {c_in}x{size} N={n_check} {dtype}: "
                    f"{errs[method]:.2e}"
                )
    times: dict[str, list[float]] = {k: [] for k in cands}
    cpu: dict[str, list[float]] = {k: [] for k in cands}  # CPU seconds of this process
    loads: list[float] = []
    for _ in range(rounds):
        loads.append(load_note(torch.get_num_threads())["loadavg_1m"])
        for method, (fn, _) in cands.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times[method].append(time.perf_counter() - t0)
            cpu[method].append(time.process_time() - c0)

    def per_round(ts: dict[str, list[float]]) -> dict[str, list[float]]:
        return {k: [t / b for t, b in zip(v, ts["fwd_bwd"], strict=True)] for k, v in ts.items()}

    ratios, cpu_ratios = per_round(times), per_round(cpu)
    med = {k: sorted(v)[len(v) // 2] for k, v in ratios.items()}
    cpu_med = {k: sorted(v)[len(v) // 2] for k, v in cpu_ratios.items()}
    peer = min((med[p] for p in PEERS if p in med), default=float("nan"))
    rows = []
    for method in cands:
        r = ratios[method]
        ms = sorted(times[method])[len(r) // 2] * 1e3
        row: dict[str, Any] = {
            **info,
            "bench": "psg_conv",
            "model": name,
            "input": f"{c_in}x{size}x{size}",
            "N": n,
            "P": n_params,
            "method": method,
            "median_ms": round(ms, 3),
            "ratio_median": round(med[method], 3),
            "ratio_min": round(min(r), 3),
            "ratio_max": round(max(r), 3),
            "ratios": " ".join(f"{v:.3f}" for v in r),
            "cpu_ratio_median": round(cpu_med[method], 3),
            "rounds": rounds,
            "max_rel_err": f"{errs[method]:.2e}",
            "loadavg_1m": round(max(loads), 2),
            "note": f"{torch.get_num_threads()} torch thread(s); max 1-min load avg "
            f"{max(loads):.1f} over the rounds",
        }
        if method in OURS:
            speedup = peer / med[method]
            need = 1.5 if peer >= 1.8 else 1.0
            row.update(
                target=TARGET[method],
                peer_ratio=round(peer, 3),
                speedup_vs_peer=round(speedup, 3),
                met="yes" if med[method] <= TARGET[method] and speedup > need else "no",
            )
        rows.append(row)
        print(
            f"{name:5s} {c_in}x{size}x{size} N={n:<3} t={torch.get_num_threads()} {method:9s} "
            f"{ms:9.1f} ms  x{med[method]:5.2f} [{min(r):.2f}-{max(r):.2f}]"
            f" (cpu x{cpu_med[method]:.2f})"
            + (
                f"  {row['speedup_vs_peer']:.2f}x vs peer  met={row['met']}"
                if method in OURS
                else ""
            )
        )
    return rows


# ---- --roofline: the ops alone against the machine's ceilings ---------------------------------
ROOFLINE_OPS = (
    ("psg_conv2d", "native"),
    ("psg_conv2d", "triton"),
    ("psg_conv2d_sqnorm", "native"),
    ("psg_conv2d_dot", "native"),
)


ROOFLINE_REPS = 10  # calls per timed region: launches overlap the kernels, as in a real loop


def _raw_op(op: str, backend: str, geom: tuple[Any, ...]) -> Callable[..., torch.Tensor]:
    """The op below the Python entry (no validation or dispatch in the timed region)."""
    if backend == "triton":
        from metafluence.kernels.triton import psg_conv2d as kernels

        tri = getattr(kernels, op)
        return lambda *t: tri(*t, *geom)
    native = getattr(torch.ops.metafluence, op)
    flat = [list(p) for p in geom[:4]] + [geom[4]]
    return lambda *t: native(*t, *flat)


def conv_layers(
    name: str, c_in: int, size: int, n: int, device: str
) -> list[tuple[str, torch.Tensor, torch.Tensor, tuple[Any, ...]]]:
    """``(layer, activations, grad_outputs, geometry)`` of every Conv2d of the model, from one
    batched forward and backward of the summed loss (float32)."""
    model, _, x, y, _ = make_problem(name, c_in, size, n, device=device)
    caught: list[tuple[str, nn.Conv2d, torch.Tensor, torch.Tensor]] = []
    hooks = [
        mod.register_forward_hook(lambda m, a, o, k=k: caught.append((k, m, a[0], o)))
        for k, mod in model.named_modules()
        if isinstance(mod, nn.Conv2d)
    ]
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [c[3] for c in caught])
    out = []
    for (k, mod, a, _), g in zip(caught, grads, strict=True):
        xp, geom = conv2d_geometry(mod, a.detach())
        out.append((k, xp.contiguous(), g.detach().contiguous(), geom))
    return out


def ceilings(device: str) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, float32 matmul GFLOP/s without TF32)."""
    big = device.startswith("cuda")
    src = torch.randn((256 if big else 16) * 2**20, device=device)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device=device)["median_s"]
    k = 8192 if big else 1024
    a, b = torch.randn(k, k, device=device), torch.randn(k, k, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = time_fn(lambda: a @ b, device=device, repeat=5)["median_s"]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * src.numel() * 4 / t_copy / 1e9, 2 * k**3 / t_mm / 1e9


def roofline(
    configs: list[tuple[str, int, int, int]], device: str, out: Path, info: dict[str, Any]
) -> list[dict[str, Any]]:
    """Rows for every (config, conv layer, op, backend): time, GB/s, share of the copy rate and of
    the floor; each op's output checked against the reference twin first."""
    copy_gbs, mm_gflops = ceilings(device)
    print(f"ceilings on {info['machine']}: copy {copy_gbs:.0f} GB/s, fp32 matmul "
          f"{mm_gflops:.0f} GFLOP/s")  # fmt: skip
    rows = []
    for name, c_in, size, n in configs:
        for layer, a, g, geom in conv_layers(name, c_in, size, n, device):
            gen = torch.Generator(device=device).manual_seed(0)
            o, cg = g.shape[1], a.shape[1] // geom[4]
            v = torch.randn(M_VECTORS, o, cg, *geom[0], generator=gen, device=device)
            kg, t = cg * geom[0][0] * geom[0][1], g.shape[2] * g.shape[3]
            for op, backend in ROOFLINE_OPS:
                args = (a, g, v) if op == "psg_conv2d_dot" else (a, g)
                fn = getattr(mf.ops, op)
                try:
                    got = fn(*args, *geom, backend=backend)
                except BackendUnavailableError as e:
                    print(f"{name} {layer} {op} {backend}: skipped ({str(e).splitlines()[0]})")
                    continue
                err = max_rel_err(got, fn(*args, *geom, backend="reference"))
                kernel = _raw_op(op, backend, geom)
                secs = time_fn(lambda k=kernel, t=args: [k(*t) for _ in range(ROOFLINE_REPS)],
                               device=device)["median_s"] / ROOFLINE_REPS  # fmt: skip
                moved = a.numel() + g.numel() + (v.numel() if op == "psg_conv2d_dot" else 0)
                moved = 4 * (moved + (n * o * kg if op == "psg_conv2d" else 0))
                flops = 2.0 * n * o * kg * t
                floor = max(moved / (copy_gbs * 1e9), flops / (mm_gflops * 1e9))
                row = {
                    **info,
                    "bench": "psg_conv_roofline",
                    "model": name,
                    "input": f"{c_in}x{size}x{size}",
                    "N": n,
                    "layer": layer,
                    "shape": f"{list(a.shape)}->{list(g.shape)}",
                    "op": op,
                    "backend": backend,
                    "median_ms": round(secs * 1e3, 4),
                    "GB_s": round(moved / secs / 1e9, 1),
                    "copy_GB_s": round(copy_gbs, 1),
                    "pct_copy": round(100 * moved / secs / 1e9 / copy_gbs, 1),
                    "GFLOP_s": round(flops / secs / 1e9, 1),
                    "matmul_GFLOP_s": round(mm_gflops, 1),
                    "bound": "memory" if moved / copy_gbs > flops / mm_gflops else "compute",
                    "pct_floor": round(100 * floor / secs, 1),
                    "max_rel_err": f"{err:.1e}",
                }
                rows.append(row)
                print(f"{name:5s} {row['input']:8s} N={n:<4} {layer:>14s} {op:17s} {backend:7s} "
                      f"{row['median_ms']:9.3f} ms {row['GB_s']:8.1f} GB/s ({row['pct_copy']:5.1f}%"
                      f" of copy) {row['GFLOP_s']:8.1f} GFLOP/s  {row['pct_floor']:5.1f}% of floor "
                      f"({row['bound']}-bound)  err {row['max_rel_err']}")  # fmt: skip
    append_csv(out, rows)
    return rows


def plot(csv_path: Path, png_path: Path) -> None:
    """One panel per (model, thread count): median ratio to fwd_bwd per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("bench") == "psg_conv"]
    last: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:  # the latest row of each (model, threads, input, N, method)
        last[(r["model"], r["threads"], r["input"], r["N"], r["method"])] = r
    panels = sorted({(k[0], k[1]) for k in last})
    if not panels:
        return
    ncols = min(2, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    flat_axes = [ax for row in axes for ax in row]
    methods = ["psg", "dots", "norms", "func_vmap", "opacus"]
    styles = {"psg": "o-", "dots": "s-", "norms": "^-", "func_vmap": "x--", "opacus": "d--"}
    for ax, (model, threads) in zip(flat_axes, panels, strict=False):
        cfgs = sorted(
            {(k[2], int(k[3])) for k in last if k[0] == model and k[1] == threads},
            key=lambda c: (c[0], c[1]),
        )
        xs = range(len(cfgs))
        for m in methods:
            ys = [
                float(last[(model, threads, c, str(n), m)]["ratio_median"])
                if (model, threads, c, str(n), m) in last
                else float("nan")
                for c, n in cfgs
            ]
            ax.plot(xs, ys, styles[m], label=m)
        ax.axhline(1.3, color="C0", lw=0.8, ls=":")
        ax.axhline(1.15, color="C1", lw=0.8, ls=":")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), [f"{c}\nN={n}" for c, n in cfgs], fontsize=7)
        ax.set_title(f"{model}, {threads} thread(s)")
        ax.set_ylabel("median time / batched fwd+bwd")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("per-sample gradients of conv nets (CPU; dotted: targets 1.3 / 1.15)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


def table(csv_path: Path) -> str:
    """Markdown table of the latest row per (threads, model, input, N): ours vs the peers."""
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("bench") == "psg_conv"]
    last: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        last[(r["threads"], r["model"], r["input"], r["N"], r["method"])] = r
    cfgs = sorted(
        {k[:4] for k in last}, key=lambda c: (int(c[0]), c[1], c[2] != "1x28x28", int(c[3]))
    )
    out = [
        "| threads | model | input | N | fwd+bwd ms | psg | dots | norms | vmap | opacus "
        "| peer ÷ psg / dots / norms | met (psg, dots, norms) | CPU-time ratios psg / dots / "
        "norms / vmap / opacus | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cfgs:

        def cell(m: str, key: str = "ratio_median", c: tuple[str, ...] = c) -> str:
            r = last.get((*c, m))
            return r[key] if r is not None and r.get(key) not in (None, "") else "–"

        fb = last.get((*c, "fwd_bwd"))
        out.append(
            f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {fb['median_ms'] if fb else '–'} "
            f"| {cell('psg')} | {cell('dots')} | {cell('norms')} | {cell('func_vmap')} "
            f"| {cell('opacus')} | {cell('psg', 'speedup_vs_peer')} / "
            f"{cell('dots', 'speedup_vs_peer')} / {cell('norms', 'speedup_vs_peer')} "
            f"| {cell('psg', 'met')}, {cell('dots', 'met')}, {cell('norms', 'met')} "
            f"| {' / '.join(cell(m, 'cpu_ratio_median') for m in (*OURS, *PEERS))} "
            f"| {fb['loadavg_1m'] if fb else '–'} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", default="conv4,res12")
    ap.add_argument("--inputs", default="1x28x28,3x84x84")
    ap.add_argument("--ns", default="25,80,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="CSV (default: results/psg_conv.csv)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--roofline", action="store_true", help="time the ops alone (see above)")
    args = ap.parse_args(argv)
    if args.roofline:
        torch.set_num_threads(int(args.threads.split(",")[0]))
        configs = [
            (model, *(int(v) for v in spec.split("x")[:2]), int(n))
            for model in args.models.split(",")
            for spec in args.inputs.split(",")
            for n in args.ns.split(",")
        ]
        out_csv = Path(args.out or RESULTS_DIR / "psg_conv_roofline.csv")
        info = {**machine_info(args.device), "device": args.device}
        roofline(configs, args.device, out_csv, info)
        return 0
    out = Path(args.out or RESULTS_DIR / "psg_conv.csv")
    if not args.plot_only:
        base = {**machine_info(args.device), "device": args.device}  # as at the start
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            info = {**base, "threads": threads}
            for model in args.models.split(","):
                for spec in args.inputs.split(","):
                    c_in, size, _ = (int(v) for v in spec.split("x"))
                    for n in (int(v) for v in args.ns.split(",")):
                        rows = bench_config(model, c_in, size, n, args.rounds, info, args.device)
                        append_csv(out, rows)  # per config: a stopped run keeps what it measured
    plot(out, out.with_suffix(".png"))
    out.with_name(out.stem + "_table.md").write_text(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
