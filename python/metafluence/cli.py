"""The ``metafluence`` command.

Subcommands: ``info`` (build information), ``build`` (compile the native kernels for the running
torch into the cache, showing the compiler's output), ``demo`` (a tiny per-sample-gradient check
across backends), ``run`` (the main influence job) and ``bench`` (the benchmark scripts of a
source checkout, by family).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn


# ---- user input: every error is one line naming the option, exit code 2 -------------------------
class _Parser(argparse.ArgumentParser):
    """``argparse`` whose usage errors are one line on stderr (``<prog>: error: ...``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _float_in(
    low: float, high: float = float("inf"), low_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    where = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < float("inf") else None
    want = where or (f"> {low:g}" if low_open else f">= {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = value == value and value != float("inf") and value <= high
        if not ok or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {want}, got {text!r}")
        return value

    return parse


def _optional(parse: Callable[[str], float]) -> Callable[[str], float | None]:
    """An argparse ``type``: ``'none'`` for None, else ``parse``."""

    def parse_or_none(text: str) -> float | None:
        return None if text.strip().lower() == "none" else parse(text)

    return parse_or_none


def _device(text: str) -> str:
    """An argparse ``type``: a torch device that exists here (cpu, cuda[:i] or mps)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda, cuda:<index> or mps")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: no CUDA device is available here (torch.cuda.is_available() is "
                "False); use --device cpu"
            )
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} CUDA device(s) visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    return text


def _check_run(args: argparse.Namespace) -> None:
    """Checks of ``run`` that argparse types cannot make; a ``ValueError`` is a user error."""
    from .data import parse_spec

    try:
        parse_spec(args.dataset, must_exist=True)
    except ValueError as e:
        raise ValueError(f"--dataset: {e}") from None
    if args.remove is not None and args.remove > args.tasks:
        raise ValueError(f"--remove {args.remove}: expected <= --tasks ({args.tasks})")


def _cmd_info(args: argparse.Namespace) -> int:
    from ._build import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"metafluence {info['version']}")
    print(f"  torch runtime : {info['torch_runtime']}")
    print(f"  torch built   : {info['torch_built']}")
    print(f"  compiler      : {info['compiler']}")
    native = info["native"]
    print(f"  native module : {'loaded' if native['loaded'] else 'not loaded'}", end="")
    print(f" ({native['reason']})" if native["reason"] else "")
    cuda = info["cuda"]
    print(f"  cuda          : {cuda['status']} (nvcc {cuda['version']}, archs {cuda['archs']})")
    print(f"  kernels       : {info['kernels']}  families {info['kernel_families']}")
    print(f"  triton        : {info['triton']['version']}, runs on {info['triton']['runs_on']}")
    for kind, why in info["missing"].items():
        print(f"  missing {kind:<6}: {why}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    import subprocess

    import torch

    from . import _jit, _loader

    if _loader.STATE.source == "prebuilt" and not args.force:
        print(
            f"metafluence: the prebuilt native module matches torch {torch.__version__}; "
            "nothing to compile (--force compiles into the cache anyway)"
        )
        return 0
    try:
        out = _jit.ensure_built(retry_failed=True, force=args.force, verbose=args.verbose)
    except _jit.JitError as err:
        print(f"metafluence build: {err.problem}\nFix: {err.fix}", file=sys.stderr)
        if err.log is not None and not args.verbose:
            print(f"--- {err.log} (last 40 lines) ---", file=sys.stderr)
            print("\n".join(err.log.read_text().splitlines()[-40:]), file=sys.stderr)
        return 1
    # load it in a fresh process: this one may already hold an older module
    check = "from metafluence import _loader as l; print(l.STATE.source, l.STATE.reason or '')"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    source = proc.stdout.split(" ", 1)[0] if proc.returncode == 0 else ""
    print(f"metafluence: native module for torch {torch.__version__} in {out}")
    if source in ("jit", "prebuilt"):
        print(f"metafluence: a new process loads it ({source})")
        return 0
    print(f"metafluence: a new process does not load it:\n{proc.stdout}{proc.stderr}")
    return 1


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from . import reference
    from .ops import _dispatch, psg_linear

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    n, t, d_in, d_out = args.samples, 3, 16, 8
    # A tiny linear model y = x W^T and squared-error loss per sample: the per-sample gradient
    # of sample n's loss w.r.t. W is sum_t (dL_n/dy[n,t])^T x[n,t] -- what psg_linear computes.
    x = torch.randn(n, t, d_in, device=device, dtype=dtype)
    weight = torch.randn(d_out, d_in, device=device, dtype=dtype, requires_grad=True)
    target = torch.randn(n, t, d_out, device=device, dtype=dtype)
    y = x @ weight.T
    y.retain_grad()
    per_sample_loss = 0.5 * ((y - target) ** 2).sum(dim=(1, 2))
    per_sample_loss.sum().backward()
    assert y.grad is not None and weight.grad is not None
    grad_outputs = y.grad.detach()

    print(
        f"psg_linear demo: N={n} samples, T={t}, in={d_in}, out={d_out}, device={device}, "
        f"dtype={args.dtype}"
    )
    ref = reference.psg_linear(x, grad_outputs)
    scale = max(1.0, ref.abs().max().item())
    sum_err = (ref.sum(0) - weight.grad).abs().max().item()
    print(f"  per-sample grads sum to autograd's batch gradient (max err {sum_err:.1e})")
    ok = sum_err <= rtol * n * scale
    report = _dispatch.backend_report("psg_linear", device, x.dtype)
    for name, why in report.items():
        if why is not None:
            print(f"  {name:<9}: skipped ({why})")
            continue
        start = time.perf_counter()
        out = psg_linear(x, grad_outputs, backend=name)
        elapsed = (time.perf_counter() - start) * 1e3
        err = (out - ref).abs().max().item()
        ok &= err <= rtol * scale
        print(f"  {name:<9}: max |diff| vs reference {err:.1e}  ({elapsed:.2f} ms)")
    print("demo " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .bilevel.curvature import METHODS, SOLVE_MODES
    from .bilevel.point import CURVATURES
    from .report.job import INNERS, RunConfig

    d = RunConfig()
    a = p.add_argument
    positive, nonneg = _int_at_least(1), _int_at_least(0)
    a(
        "--dataset",
        default=d.dataset,
        help="'glyphs' (embedded) or '<kind>:<path>', kind one of "
        "omniglot, mini-imagenet, tiered-imagenet, cifar-fs, fc100, cub, idx, npz, folder",
    )
    a("--ways", type=_int_at_least(2), default=d.ways, help="classes per task (N-way)")
    a("--shots", type=positive, default=d.shots, help="support points per class (K-shot)")
    a("--queries", type=positive, default=d.queries, help="query points per class")
    a("--tasks", type=positive, default=d.tasks, help="meta-training tasks")
    a("--target-tasks", type=positive, default=d.target_tasks, help="target tasks (val split)")
    a("--eval-tasks", type=positive, default=d.eval_tasks, help="evaluation tasks (test split)")
    a(
        "--noise",
        type=_float_in(0.0, 1.0),
        default=d.noise,
        help="fraction of tasks with flipped labels",
    )
    a(
        "--flip",
        choices=("support", "query"),
        default=d.flip,
        help="which labels of a flipped task are permuted",
    )
    a("--inner", choices=INNERS, default=d.inner, help="inner map")
    a(
        "--inner-steps",
        type=positive,
        default=d.inner_steps,
        help="gradient steps of the inner map per task (unrolled / head-only)",
    )
    a(
        "--inner-lr",
        type=_float_in(0.0, low_open=True),
        default=d.inner_lr,
        help="step size of the inner map's gradient steps",
    )
    a("--model", choices=["conv4", "mlp"], default=d.model, help="network meta-trained")
    a("--width", type=positive, default=d.width, help="Conv-4 filters / MLP width")
    a(
        "--curvature",
        choices=CURVATURES,
        default=d.curvature,
        help="total Hessian of the solves (math.md §2)",
    )
    a(
        "--curvature-method",
        choices=(*METHODS, "auto"),
        default=d.curvature_method,
        help="what mf.fit_curvature builds once for every solve of the job: krylov (nothing), "
        "dense (small P), lowrank (a rank --rank preconditioner), auto",
    )
    a("--rank", type=positive, default=d.rank, help="rank of a lowrank curvature fit")
    a("--solver", choices=SOLVE_MODES, default=d.solver, help="total solver")
    a(
        "--maxiter",
        type=positive,
        default=d.maxiter,
        help="iterations of a Krylov total solve (curvature method krylov/lowrank)",
    )
    a(
        "--pcg-iters",
        type=positive,
        default=d.pcg_iters,
        help="CG iterations of each total solve preconditioned by the secant curvature "
        "(curvature method secant, solver cg)",
    )
    a("--damping", type=_float_in(0.0), default=d.damping, help="damping δ of the meta-objective")
    a(
        "--solve-damping",
        type=_float_in(0.0),
        default=d.solve_damping,
        help="δ' added in the solve only",
    )
    a("--steps", type=nonneg, default=d.steps, help="meta-training steps")
    a(
        "--stationary-tol",
        type=_optional(_float_in(0.0, low_open=True)),
        default=d.stationary_tol,
        help="after --steps, full-batch L-BFGS until ‖∇F‖ <= this (also for every retrain); "
        "'none': no stationarity phase",
    )
    a(
        "--stationary-evals",
        type=positive,
        default=d.stationary_evals,
        help="gradient evaluations the stationarity phase may use",
    )
    a(
        "--outer-lr",
        type=_float_in(0.0, low_open=True),
        default=d.outer_lr,
        help="meta-training step size (Adam)",
    )
    a("--meta-batch", type=positive, default=d.meta_batch, help="tasks per meta-training step")
    a(
        "--retrain-steps",
        type=nonneg,
        default=d.retrain_steps,
        help="meta-training steps of each retraining from λ* (ground truth and the "
        "continued-training control)",
    )
    a("--remove", type=nonneg, default=None, help="tasks to remove (default: number flipped)")
    a(
        "--glyph-classes",
        type=_int_at_least(3),
        default=d.glyph_classes,
        help="classes drawn from the embedded glyph dataset (--dataset glyphs)",
    )
    a("--device", type=_device, default=d.device, help="cpu, cuda, cuda:<index> or mps")
    a("--dtype", choices=["float32", "float64"], default=d.dtype, help="floating dtype")
    a("--threads", type=nonneg, default=d.threads, help="torch CPU threads (0: torch default)")
    a("--chunk-size", type=positive, default=d.chunk_size, help="tasks per batched engine call")
    a("--seed", type=nonneg, default=d.seed, help="seed of task sampling, noise and training")
    a("--out", default=d.out, help="results folder (the report goes to <out>/<name>/)")
    a("--name", default=None, help="run name (default from the configuration)")
    a("--quiet", action="store_true", help="no progress bars")
    a(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        help="let glibc return freed memory to the system after each pass (default on CPU: keep "
        "it for reuse; about 2x faster second-order passes, resident memory stays at its peak)",
    )
    a(
        "--nproc",
        type=positive,
        default=1,
        help="worker processes sharing the tasks (torch.distributed on loopback; gloo on CPU, "
        "nccl with one GPU each); under torchrun the launcher's WORLD_SIZE is used",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from .data import DatasetLayoutError
    from .distributed.launch import in_worker, launch
    from .report.job import RunConfig, run

    where = ""
    if in_worker():  # started by torchrun or by --nproc below: this is one of the workers
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc not in (1, world):
            print(
                f"metafluence run: error: --nproc {args.nproc} but this process was launched as "
                f"one of WORLD_SIZE={world} workers (drop --nproc under torchrun)",
                file=sys.stderr,
            )
            return 2
        where = f" (rank {os.environ['RANK']})" if world > 1 else ""
    elif args.nproc > 1:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if torch.device(args.device).type == "cuda" and gpus < args.nproc:
            print(
                f"metafluence run: error: --nproc {args.nproc} with --device {args.device} needs "
                f"one GPU per worker; {gpus} visible",
                file=sys.stderr,
            )
            return 2
        # the same command line in every worker; there in_worker() is true and --nproc is ignored
        return launch(args.argv, args.nproc)
    cfg = RunConfig(**{k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__})
    cfg.threads = cfg.threads or None
    try:
        summary = run(cfg)
    except (DatasetLayoutError, ImportError) as e:
        print(f"metafluence run: error{where}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # invalid combinations (e.g. more ways than classes)
        print(f"metafluence run: error{where}: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0" and in_worker():
        return 0  # rank 0 reports
    d = summary["detection"]
    ev = summary["evaluation"]
    print(
        f"report: {summary['out']}/report.html  (task AUC {d['task_auc']:.3f}, recall@{d['k']} "
        f"{d['recall_at_k']:.2f}; target acc original {ev['original']['target']['accuracy']:.3f}, "
        f"edited {ev['edited']['target']['accuracy']:.3f}, retrained "
        f"{ev['retrained']['target']['accuracy']:.3f}; {summary['wall_seconds']:.0f} s)"
    )
    return 0


BENCH_FAMILIES = {
    "per-sample-grads": ["bench_psg_linear.py", "bench_psg.py"],
    "solvers": ["bench_solvers.py"],
    "influence": ["bench_influence.py", "bench_hvp.py"],
}


def _benchmarks_dir() -> str | None:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (
        os.path.join(here, "..", "..", "benchmarks"),
        os.path.join(os.getcwd(), "benchmarks"),
    ):
        if os.path.isfile(os.path.join(cand, "harness.py")):
            return os.path.normpath(cand)
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    import os
    import subprocess

    root = _benchmarks_dir()
    if root is None:
        print(
            "metafluence bench: error: benchmarks/ not found; run it from a source checkout "
            "(the scripts are not part of the wheel)",
            file=sys.stderr,
        )
        return 2
    families = list(BENCH_FAMILIES) if args.family == "all" else [args.family]
    rc = 0
    for fam in families:
        for script in BENCH_FAMILIES[fam]:
            path = os.path.join(root, script)
            if not os.path.isfile(path):
                print(f"metafluence bench: skipping {script} (not present)", file=sys.stderr)
                continue
            print(f"== {fam}: {script} {' '.join(args.extra)}", flush=True)
            rc = max(rc, subprocess.call([sys.executable, path, *args.extra]))
    return rc


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="metafluence",
        description="Influence (removal effects) for meta-learning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_info = sub.add_parser("info", help="show build information (compiled kernels, versions)")
    p_info.add_argument("--json", action="store_true", help="print the build_info() dict as JSON")
    p_info.set_defaults(func=_cmd_info)

    p_build = sub.add_parser(
        "build", help="compile the native kernels for the running torch (cached per user)"
    )
    p_build.add_argument("--force", action="store_true", help="recompile even if cached")
    p_build.add_argument("--verbose", action="store_true", help="print compiler commands/output")
    p_build.set_defaults(func=_cmd_build)

    p_demo = sub.add_parser("demo", help="tiny per-sample-gradient demo comparing backends")
    p_demo.add_argument(
        "--samples", type=_int_at_least(1), default=97, help="samples in the demo batch"
    )
    p_demo.add_argument("--device", type=_device, default="cpu", help="cpu, cuda[:i] or mps")
    p_demo.add_argument(
        "--dtype", choices=["float32", "float64"], default="float64", help="floating dtype"
    )
    p_demo.set_defaults(func=_cmd_demo)

    p_run = sub.add_parser("run", help="the main job: influence of meta-training tasks")
    _add_run_args(p_run)
    p_run.set_defaults(func=_cmd_run, check=_check_run)

    p_bench = sub.add_parser(
        "bench", help="run benchmark scripts (results appended under benchmarks/results/)"
    )
    p_bench.add_argument(
        "family",
        nargs="?",
        default="all",
        choices=[*BENCH_FAMILIES, "all"],
        help="which benchmark scripts to run (default: all)",
    )
    p_bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments for each script")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit code (2: a user error, on one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else 2
    args.argv = argv
    check: Callable[[argparse.Namespace], None] | None = getattr(args, "check", None)
    if check is not None:
        try:  # only the validation of user input: errors in the job itself keep their traceback
            check(args)
        except (ValueError, TypeError) as e:
            print(f"metafluence {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
