"""Where the influence time goes on the job's problem, and what the curvature choice costs
(issue 16): meta-training (Adam, then the stationarity phase) against scores + edit.

The problem is ``metafluence run``'s (glyphs, 5-way 1-shot, 5 queries per class, Conv-4/32
ANIL, float32, 1 thread, δ = 1e-3, 20% of the tasks with flipped support labels; target = the
mean post-adaptation query loss of 40 val-split tasks). For ``M`` tasks:

1. meta-train: ``steps`` Adam steps on meta-batches of 32, then the stationarity phase
   (full-batch L-BFGS, ``--tol``, at most ``--evals`` gradient evaluations), which keeps its
   secant pairs; the unit costs of one meta-gradient, one Gauss-Newton and one exact total-HVP
   product over all ``M`` tasks are measured at ``λ*``;
2. for each curvature variant (``--variants``): fit, all scores (task, support point, query
   point: one ``removal_effects`` call, ``diagnostics=False``), one edit removing the ``k``
   most harmful tasks (``k`` = the number flipped), each timed; the variant's task scores are
   compared (Spearman, relative error) with the reference solve (the secant-preconditioned
   exact solve run to ``--ref-rtol``) and its flipped-task AUC is reported.

Variants: ``cg15`` the job's former default (Gauss-Newton, CG, 15 iterations, δ' = 1);
``secant`` the stationarity phase's pairs used directly (``solver="approx"``, exact
curvature, δ' = ``--secant-damping``); ``secant-pcgK``: the same pairs as the preconditioner
of CG with ``K`` iterations.

3. where the time goes for the job's default (``--stages``, ``secant-pcg2``): the target
   gradient, the total solve, the item scores (one mixed product), the edit's right-hand side
   and its solve, each timed alone;
4. leave-one-out cost (``--loo-retrains K``): ``K`` tasks (evenly spread) are each removed and
   the meta-parameters retrained warm from ``λ*`` by the same stationarity rule (``--tol``,
   ``--evals``); ``M ×`` their mean time estimates leave-one-out of all ``M`` tasks, compared
   with the time of all scores; their ``Δf`` is printed beside the predicted scores.

``--plot`` draws ``influence_cost_vs_M.png`` from the CSV (the rows with leave-one-out times).

    python benchmarks/influence_cost.py --M 120
    python benchmarks/influence_cost.py --M 500 --variants secant-pcg2 --ref-maxiter 20
    python benchmarks/influence_cost.py --plot
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from harness import RESULTS_DIR, append_csv, machine_info  # noqa: E402
from metafluence.evaluate import adapted_performance  # noqa: E402
from metafluence.models import build_model  # noqa: E402
from metafluence.report.job import RunConfig, _inner  # noqa: E402

OUT = RESULTS_DIR / "influence_cost"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--M", type=int, default=120, help="meta-training tasks")
    p.add_argument("--steps", type=int, default=150, help="Adam steps before the phase")
    p.add_argument("--tol", type=float, default=1e-3, help="stationarity tolerance on ‖∇F‖")
    p.add_argument("--evals", type=int, default=60, help="stationarity gradient evaluations")
    p.add_argument("--variants", default="cg15,secant,secant-pcg2,secant-pcg4")
    p.add_argument("--secant-damping", type=float, default=0.0, help="δ' of the secant variants")
    p.add_argument("--tail-probes", type=int, default=0, help="HVP rows for the secant tail")
    p.add_argument(
        "--ref",
        default="exact",
        choices=("exact", "gauss_newton"),
        help="reference solve: exact curvature (secant-preconditioned CG) or Gauss-Newton CG, "
        "both with δ' = --secant-damping",
    )
    p.add_argument("--ref-rtol", type=float, default=1e-3)
    p.add_argument("--ref-maxiter", type=int, default=30)
    p.add_argument("--loo-retrains", type=int, default=5, help="measured warm retrains")
    p.add_argument("--stages", default="secant-pcg2", help="variant timed stage by stage")
    p.add_argument("--plot", action="store_true", help="only draw the plot against M")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--no-keep-freed-memory",
        dest="keep_freed_memory",
        action="store_false",
        help="as metafluence run: by default glibc keeps freed memory (mf.keep_freed_memory)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("/tmp/mf_influence_cost"))
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


class Job:
    """The job's data, model and problem (``RunConfig`` defaults)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        # job_fidelity.py / job_floor.py set the outer damping; job_floor.py also the model's
        # normalisation and the task sizes
        keys = ("damping", "shots", "queries")
        over = {k: v for k in keys if (v := getattr(a, k, None)) is not None}
        self.cfg = cfg = RunConfig(seed=a.seed, **over)
        self.norm = getattr(a, "norm", None) or "group"
        plain = self.norm == "group" and "shots" not in over and "queries" not in over
        self.variant = "" if plain else f"-{self.norm}-{cfg.shots}s{cfg.queries}q"  # cache key
        ds = mf.data.load_glyphs(num_classes=cfg.glyph_classes, seed=0, progress=False)
        kw: dict[str, Any] = dict(ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=a.seed)
        clean = mf.data.sample_tasks(ds, num_tasks=a.M, split="train", **kw)
        self.tasks, mask = mf.data.flip_labels(clean, cfg.noise, level="task", seed=a.seed)
        assert isinstance(mask, torch.Tensor)
        self.mask = mask
        self.target = mf.data.sample_tasks(
            ds, num_tasks=cfg.target_tasks, split="val", first_id=10**6, **kw
        )
        self.test = mf.data.sample_tasks(
            ds, num_tasks=cfg.eval_tasks, split="test", first_id=2 * 10**6, **kw
        )
        c, h, _ = ds.image_shape
        self.model = build_model(
            "conv4", cfg.ways, c, h, width=cfg.width, seed=a.seed, pool="stride", norm=self.norm
        )
        self.problem = mf.MetaProblem(
            self.model, inner=_inner(cfg), damping=cfg.damping, chunk_size=cfg.chunk_size
        )

    def train(self) -> tuple[dict, dict[str, Any]]:
        """λ*, its stationarity report and secant pairs, and the stage times (cached)."""
        a = self.a
        # v2: one-pass (F, ∇F) in the stationarity phase (a faster meta-training than v1's)
        d = "" if getattr(a, "damping", None) is None else f"-d{a.damping:g}"
        d += self.variant
        key = a.cache / f"v2-M{a.M}{d}-s{a.steps}-tol{a.tol:g}-e{a.evals}-seed{a.seed}.pt"
        if key.exists():
            got = torch.load(key, weights_only=False)
            log(f"meta-train: cached {key}")
            return got["lam"], got["info"]
        info: dict[str, Any] = {}
        stamps: list[float] = []
        t0 = time.perf_counter()
        lam = mf.train.meta_train(
            self.problem,
            self.model,
            self.tasks,
            steps=a.steps,
            outer_lr=self.cfg.outer_lr,
            seed=a.seed,
            optimizer="adam",
            batch_size=self.cfg.meta_batch,
            stationary_tol=a.tol,
            stationary_evals=a.evals,
            info=info,
            callback=lambda *_: stamps.append(time.perf_counter()),
        )
        info["t_train"] = time.perf_counter() - t0
        info["t_adam"] = (stamps[-1] - t0) if stamps else float("nan")
        a.cache.mkdir(parents=True, exist_ok=True)
        torch.save({"lam": lam, "info": info}, key)
        return lam, info


def unit_costs(job: Job, lam: dict) -> dict[str, float]:
    """Seconds of one meta-gradient, one GN product and one exact HVP over all M tasks: the
    HVP on a fresh point (``t_hvp``: linearisation + product) and again on a point that holds
    its linearisation (``t_hvp_reused``: one backward pass, what a solve iteration costs)."""
    pt = job.problem.point(lam, job.tasks)
    v = torch.randn(pt.lam.numel(), generator=torch.Generator().manual_seed(0))
    pt.hvp(v, "exact")  # pt now holds its linearisation
    out = {}
    for name, fn in (
        ("t_grad", lambda: job.problem.point(lam, job.tasks).meta_grad()),  # (pt's is kept)
        ("t_gn", lambda: pt.hvp(v, "gauss_newton")),
        ("t_hvp", lambda: job.problem.point(lam, job.tasks).hvp(v, "exact")),
        ("t_hvp_reused", lambda: pt.hvp(v, "exact")),
    ):
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def curvature(job: Job, lam: dict, info: dict, variant: str, a: argparse.Namespace):
    """The variant's fitted curvature (and the fit's seconds)."""
    t0 = time.perf_counter()
    if variant == "ref" and a.ref == "gauss_newton":
        curv = mf.fit_curvature(
            job.problem, lam, job.tasks, kind="gauss_newton", method="krylov", solver="cg",
            solve_damping=a.secant_damping,
            options={"maxiter": a.ref_maxiter, "rtol": a.ref_rtol},
        )  # fmt: skip
    elif variant == "cg15":
        curv = mf.fit_curvature(
            job.problem, lam, job.tasks, kind="gauss_newton", method="krylov", solver="cg",
            solve_damping=1.0, options={"maxiter": 15},
        )  # fmt: skip
    elif variant.startswith("secant") or variant == "ref":
        if variant == "ref":
            solver, opts = "cg", {"maxiter": a.ref_maxiter, "rtol": a.ref_rtol}
        elif variant == "secant":
            solver, opts = "approx", {"check_residual": False}
        else:
            iters = int(variant.removeprefix("secant-pcg"))
            solver, opts = "cg", {"maxiter": iters, "rtol": 1e-6, "true_residual": False}
        curv = mf.fit_curvature(
            job.problem, lam, job.tasks, kind="exact", method="secant", solver=solver,
            solve_damping=a.secant_damping, pairs=info["secant_pairs"], options=opts,
            tail_probes=a.tail_probes,
        )  # fmt: skip
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    return curv, time.perf_counter() - t0


def run_variant(job: Job, lam: dict, info: dict, variant: str, a: argparse.Namespace) -> dict:
    curv, t_fit = curvature(job, lam, info, variant, a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = mf.removal_effects(
            job.problem, lam, job.tasks, target=job.target, curvature=curv, diagnostics=False
        )
        t_scores = time.perf_counter() - t0
        k = int(job.mask.sum())
        removed = sorted(torch.argsort(res.scores).tolist()[:k])
        t0 = time.perf_counter()
        edited = mf.edit(job.problem, lam, job.tasks, remove={"task": removed}, curvature=curv)
        t_edit = time.perf_counter() - t0
    solve = res.diagnostics.get("solve", {})
    return {
        "variant": variant,
        "t_fit": t_fit,
        "t_scores": t_scores,
        "t_edit": t_edit,
        "t_influence": t_fit + t_scores + t_edit,
        "solve_iters": solve.get("iters"),
        "solve_residual": solve.get("residual"),
        "tail": curv.tail,
        "rank": None if curv.eigvals is None else int(curv.eigvals.numel()),
        "task_auc": mf.evaluate.detection_auc(res.scores, job.mask),
        "scores": res.scores.detach().double(),
        "edited_target_loss": adapted_performance(job.problem, edited, job.target)["loss"],
    }


def stages(job: Job, lam: dict, info: dict, variant: str, a: argparse.Namespace) -> dict:
    """Seconds of each stage of scores + edit for ``variant``, each timed alone."""
    from metafluence.influence.removal import target_gradient

    curv, t_fit = curvature(job, lam, info, variant, a)
    out = {"stage_fit": t_fit}
    t0 = time.perf_counter()
    pt = job.problem.point(lam, job.tasks)
    g = target_gradient(job.problem, pt.lam, job.target)
    out["stage_target_grad"] = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        with pt.recording() as tape:  # as removal_effects: the scores are read off its products
            s = curv.solve(pt, g).x
        out["stage_solve"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        t_sc = pt.item_scores(s.detach(), tape)[0]
        out["stage_item_scores"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pt.meta_grad()  # ‖∇F(λ*)‖ of the diagnostics: the linearisation's own value
        out["stage_meta_grad"] = time.perf_counter() - t0
        removed = sorted(torch.argsort(t_sc).tolist()[: int(job.mask.sum())])
        t0 = time.perf_counter()
        rhs = pt.removal_rhs({"task": removed})
        out["stage_edit_rhs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        curv.solve(pt, rhs)
        out["stage_edit_solve"] = time.perf_counter() - t0
    return out


def loo_retrains(job: Job, lam: dict, a: argparse.Namespace) -> tuple[list[int], list[float], list]:
    """``K`` warm leave-one-out retrains by the stationarity rule: (tasks, seconds, reports)."""
    K = min(a.loo_retrains, a.M)
    idx = sorted({round(i * (a.M - 1) / max(K - 1, 1)) for i in range(K)})
    batch = job.problem.batch(job.tasks, job.problem.flat(lam))
    secs, reps = [], []
    for i in idx:
        t0 = time.perf_counter()
        new, rep = mf.train.make_stationary(
            job.problem, lam, batch.reweighted({"task": [i]}, 0.0), tol=a.tol, max_evals=a.evals,
            keep_pairs=0, return_best=False,
        )  # fmt: skip
        secs.append(time.perf_counter() - t0)
        reps.append((new, rep))
        log(f"leave-one-out retrain of task {i}: {secs[-1]:.1f} s, {rep.line()}")
    return idx, secs, reps


def plot(out: Path) -> None:
    """Influence (scores + edit) and meta-training seconds against M, and their ratio."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "influence_cost.csv") as fh:  # this round's rows: the reused-HVP column
        rows = [r for r in csv.DictReader(fh) if r.get("t_hvp_reused")]
    latest = {(int(r["M"]), r["variant"]): r for r in rows}  # the last row of each (M, variant)
    loo = {int(r["M"]): float(r["t_loo_estimate"]) for r in rows if r.get("t_loo_estimate")}
    if not loo:
        raise SystemExit("no rows with leave-one-out times yet")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in sorted({v for _, v in latest} - {"ref"}):
        rs = sorted((r for (_, v), r in latest.items() if v == variant), key=lambda r: int(r["M"]))
        Ms = [int(r["M"]) for r in rs]
        ax.plot(Ms, [float(r["t_influence"]) for r in rs], "o-", label=f"scores + edit: {variant}")
        bx.plot(Ms, [float(r["influence_over_train"]) for r in rs], "o-", label=variant)
    rs = sorted({int(r["M"]): r for r in latest.values()}.values(), key=lambda r: int(r["M"]))
    Ms = [int(r["M"]) for r in rs]
    ax.plot(Ms, [float(r["t_train"]) for r in rs], "k^-", label="meta-training")
    ax.plot(sorted(loo), [loo[m] for m in sorted(loo)], "rs--", label="leave-one-out, all M")
    ax.set(xscale="log", yscale="log", xlabel="M (tasks)", ylabel="seconds (1 thread)")
    ax.legend(fontsize=7)
    bx.axhline(0.1, color="k", ls=":", label="target 1/10")
    bx.set(xscale="log", xlabel="M (tasks)", ylabel="scores + edit ÷ meta-training")
    bx.legend(fontsize=7)
    fig.suptitle("Influence cost on the metafluence run job (Conv-4 ANIL, P = 28,965)")
    fig.tight_layout()
    fig.savefig(out / "influence_cost_vs_M.png", dpi=110)
    log(f"wrote {out / 'influence_cost_vs_M.png'}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.plot:
        plot(a.out)
        return 0
    torch.set_num_threads(a.threads)
    kept = mf.keep_freed_memory() if a.keep_freed_memory else False
    log(f"keep freed memory: {kept}")
    job = Job(a)
    P = job.problem.spec.size
    log(f"M={a.M} P={P}: meta-train")
    lam, info = job.train()
    st = info["stationarity"]
    log(f"trained in {info['t_train']:.1f} s (Adam {info['t_adam']:.1f} s); {st}")
    units = unit_costs(job, lam)
    log(f"unit costs {units}")
    base = adapted_performance(job.problem, lam, job.target)["loss"]
    rows, ref = [], None
    ref_key = a.cache / (
        f"ref-M{a.M}-s{a.steps}-tol{a.tol:g}-e{a.evals}-seed{a.seed}-{a.ref}-dp{a.secant_damping:g}"
        f"-it{a.ref_maxiter}-rtol{a.ref_rtol:g}.pt"
    )
    for variant in ["ref", *[v for v in a.variants.split(",") if v]]:
        log(f"variant {variant}")
        if variant == "ref" and ref_key.exists():
            ref = torch.load(ref_key, weights_only=False)["scores"]
            log(f"reference: cached {ref_key} (its row is in the CSV already)")
            continue
        r = run_variant(job, lam, info, variant, a)
        scores = r.pop("scores")
        if variant == "ref":
            torch.save({"scores": scores}, ref_key)
        if variant == "ref":
            ref = scores
        assert ref is not None
        corr = mf.evaluate.correlation(scores, ref)
        r.update(
            spearman_vs_ref=corr["spearman"],
            rel_err_vs_ref=corr["rel_error"],
            edit_delta_target=r.pop("edited_target_loss") - base,
            influence_over_train=r["t_influence"] / info["t_train"],
        )
        log({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        rows.append(
            {
                "M": a.M,
                "P": P,
                **{k: v for k, v in r.items()},
                "t_train": info["t_train"],
                "t_adam": info["t_adam"],
                "t_stationary": st["seconds"],
                "stationary_evals": st["evaluations"],
                "grad_norm_before": st["grad_norm_before"],
                "grad_norm_after": st["grad_norm_after"],
                "secant_pairs": st.get("secant_pairs"),
                **units,
                "secant_damping": a.secant_damping,
                "tail_probes": a.tail_probes,
                "ref": a.ref,
                "threads": a.threads,
                "keep_freed_memory": kept,
                **machine_info(),
            }
        )
    extra: dict[str, Any] = {}
    if a.stages:
        extra.update(stages(job, lam, info, a.stages, a))
        log(f"stages of {a.stages}: {extra}")
    if a.loo_retrains > 0:
        idx, secs, reps = loo_retrains(job, lam, a)
        per = statistics.mean(secs)
        extra.update(
            loo_retrains=len(secs),
            t_loo_retrain=per,
            loo_retrain_evals=statistics.mean(r.evaluations for _, r in reps),
            loo_retrain_converged=sum(r.converged for _, r in reps),
            t_loo_estimate=a.M * per,
        )
        dfs = [adapted_performance(job.problem, new, job.target)["loss"] - base for new, _ in reps]
        log(f"leave-one-out Δf of tasks {idx}: {[round(d, 5) for d in dfs]}")
        for r in rows:
            r["loo_over_scores"] = a.M * per / r["t_scores"]
            log(f"{r['variant']}: leave-one-out of all M ≈ {a.M * per:.0f} s = "
                f"{r['loo_over_scores']:.0f}× its scores")  # fmt: skip
    for r in rows:
        r.update(extra)
    append_csv(a.out / "influence_cost.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
