"""Fidelity on the job's model (issue 16, items 4–5): task scores against leave-one-task-out
retraining at P = 28,965, the edit against retraining and the continued-training control, and
flipped-task detection beside loss ranking and TracIn.

The problem is ``metafluence run``'s (glyphs, 5-way 1-shot, 5 queries per class, Conv-4/32
ANIL, float32, 1 thread, 20% of the tasks with flipped support labels; target = the mean
post-adaptation query loss of 40 val-split tasks) with ``M`` tasks and outer damping
``--damping``. Every retrain stops by the rule that made ``λ*`` stationary: full-batch L-BFGS
until ``‖∇F‖ ≤ --tol`` or ``--evals`` evaluations (:func:`mf.evaluate.stationary_retrain`).

1. ``λ*``: ``--steps`` Adam steps on meta-batches of 32, then the stationarity phase.
2. Scores (task, one ``removal_effects`` call with diagnostics): the job's default curvature
   (the phase's secant pairs preconditioning CG on the exact Hessian, ``--pcg-iters``) and a
   reference solve run to ``--ref-rtol``, both with solve damping ``--solve-damping``.
3. Leave-one-out of every task, warm from ``λ*`` by the same rule (checkpointed: a rerun
   resumes); per item whether the retrain reached the tolerance.
4. Spearman / Pearson of the scores against leave-one-out; detection AUC of the flipped tasks
   for influence, the reference, loss ranking, TracIn and leave-one-out itself (are the
   flipped tasks harmful at all?).
5. Removing the flipped tasks: the edit (one solve), the warm retrain by the same rule, the
   continued-training control (the same number of evaluations on all tasks from ``λ*``), and
   full retrains from scratch without them over ``--seeds`` seeds: Δ target loss, test
   accuracy, and the share of the retrain-minus-control difference the edit recovers.

    python benchmarks/job_fidelity.py --M 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from harness import RESULTS_DIR, machine_info  # noqa: E402
from influence_cost import Job, log  # noqa: E402
from metafluence.evaluate import adapted_performance, baselines  # noqa: E402

OUT = RESULTS_DIR / "job_fidelity"


def job_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The problem and λ*'s arguments, shared with ``job_floor.py`` (one λ* cache)."""
    p.add_argument("--M", type=int, default=40, help="meta-training tasks")
    p.add_argument("--damping", type=float, default=1e-2, help="outer damping δ of the problem")
    p.add_argument("--steps", type=int, default=150, help="Adam steps before the phase")
    p.add_argument("--tol", type=float, default=1e-4, help="stationarity tolerance on ‖∇F‖")
    p.add_argument("--evals", type=int, default=300, help="stationarity gradient evaluations")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("/tmp/mf_job_fidelity"))
    p.add_argument("--out", type=Path, default=OUT)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    job_args(p)
    p.add_argument("--solve-damping", type=float, default=0.0, help="δ' of the scores' solve")
    p.add_argument("--pcg-iters", type=int, default=2, help="the job default's CG iterations")
    p.add_argument("--ref-rtol", type=float, default=1e-4)
    p.add_argument("--ref-maxiter", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3, help="full retrains from scratch")
    p.add_argument("--train-only", action="store_true", help="stop after λ*")
    return p.parse_args(argv)


def secant(job: Job, lam: dict, info: dict, a: argparse.Namespace, **opts: Any):
    return mf.fit_curvature(
        job.problem, lam, job.tasks, kind="exact", method="secant", solver="cg",
        solve_damping=a.solve_damping, pairs=info["secant_pairs"], options=opts,
    )  # fmt: skip


def performance(job: Job, lam: dict) -> dict[str, float]:
    t = adapted_performance(job.problem, lam, job.target)
    e = adapted_performance(job.problem, lam, job.test)
    return {"target_loss": t["loss"], "test_loss": e["loss"], "test_acc": e["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    mf.keep_freed_memory()  # as metafluence run on CPU: no page faults per pass
    a.out.mkdir(parents=True, exist_ok=True)
    job = Job(a)
    P = job.problem.spec.size
    tag = f"M{a.M}-d{a.damping:g}-tol{a.tol:g}-e{a.evals}-seed{a.seed}"
    log(f"M={a.M} P={P} δ={a.damping:g}: meta-train")
    lam, info = job.train()
    st = info["stationarity"]
    log(f"trained in {info['t_train']:.1f} s: {st}; test {performance(job, lam)}")
    if a.train_only:
        return 0
    base = performance(job, lam)
    flipped = torch.nonzero(job.mask).flatten().tolist()
    row: dict[str, Any] = {"M": a.M, "P": P, "damping": a.damping, "tol": a.tol}
    row.update(t_train=info["t_train"], stationarity=st, base=base)

    # ---- scores: the job's default and a converged reference -----------------------------
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = mf.removal_effects(
            job.problem, lam, job.tasks, target=job.target,
            curvature=secant(job, lam, info, a, maxiter=a.pcg_iters, rtol=1e-8),
        )  # fmt: skip
    row["t_scores"] = time.perf_counter() - t0
    diag = res.diagnostics
    row["job_solve"] = {k: diag.get("solve", {}).get(k) for k in ("iters", "residual")}
    row["regime"] = diag.get("regime")
    row["spectrum"] = {k: diag.get(k) for k in ("lambda_min", "lambda_max", "condition")}
    row["notes"] = [str(w.message)[:300] for w in caught]
    log(f"scores in {row['t_scores']:.1f} s; regime {row['regime']}; {row['job_solve']}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = mf.removal_effects(
            job.problem, lam, job.tasks, target=job.target, diagnostics=False,
            curvature=secant(job, lam, info, a, maxiter=a.ref_maxiter, rtol=a.ref_rtol),
        )  # fmt: skip
    row["ref_solve"] = {"iters": ref.solve.iters, "residual": float(ref.solve.residual)}
    log(f"reference solve {row['ref_solve']}")
    loss_sc = baselines.loss_ranking(job.problem, lam, job.tasks).task
    tracin_sc = baselines.tracin(job.problem, lam, job.tasks, job.target, support_points=False).task

    # ---- leave-one-out of every task, by the same rule --------------------------------------
    details: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loo = mf.evaluate.leave_one_out(
            job.problem, lam, job.tasks, job.target,
            retrain=mf.evaluate.stationary_retrain(job.problem, a.tol, a.evals),
            stationary_tol=a.tol, check_minimum=False, details=details, progress=True,
            checkpoint_dir=a.cache / f"loo-{tag}",
        )  # fmt: skip
    row["t_loo"] = time.perf_counter() - t0
    row["loo_converged"] = sum(d["converged"] for d in details)
    row["loo_grad_norm_max"] = max(d["grad_norm"] for d in details)
    row["loo_notes"] = [str(w.message)[:300] for w in caught]
    log(f"leave-one-out: {row['loo_converged']}/{a.M} converged, {row['t_loo']:.0f} s")
    row["spearman"] = {
        "job": mf.evaluate.correlation(res.scores, loo),
        "reference": mf.evaluate.correlation(ref.scores, loo),
        "job_vs_reference": mf.evaluate.correlation(res.scores, ref.scores),
    }
    auc = mf.evaluate.detection_auc
    row["auc"] = {
        "influence": auc(res.scores, job.mask),
        "reference": auc(ref.scores, job.mask),
        "loss": auc(loss_sc, job.mask),
        "tracin": auc(tracin_sc, job.mask),
        "leave_one_out": auc(loo, job.mask),
    }
    row["flipped_loo_mean"] = float(loo[job.mask].mean())
    row["clean_loo_mean"] = float(loo[~job.mask].mean())
    log(f"spearman {row['spearman']}; auc {row['auc']}")

    # ---- remove the flipped tasks: edit, retrain, control, full retrains -------------------
    batch = job.problem.batch(job.tasks, job.problem.flat(lam))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        edited = mf.edit(
            job.problem, lam, job.tasks, remove={"task": flipped},
            curvature=secant(job, lam, info, a, maxiter=a.pcg_iters, rtol=1e-8),
        )  # fmt: skip
        t_edit = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrained, rr = mf.train.make_stationary(
        job.problem, lam, batch.reweighted({"task": flipped}, 0.0), tol=a.tol, max_evals=a.evals,
        keep_pairs=0, return_best=False,
    )  # fmt: skip
    t_retrain = time.perf_counter() - t0
    control, rc = mf.train.make_stationary(
        job.problem, lam, batch, tol=1e-30, max_evals=rr.evaluations, keep_pairs=0,
        return_best=False,
    )  # fmt: skip
    full = []
    clean = [t for t, m in zip(job.tasks, job.mask.tolist(), strict=True) if not m]
    for seed in range(a.seeds):
        t0 = time.perf_counter()
        fi: dict[str, Any] = {}
        lam_s = mf.train.meta_train(
            job.problem, job.model, clean, steps=a.steps, outer_lr=job.cfg.outer_lr, seed=seed,
            optimizer="adam", batch_size=job.cfg.meta_batch, stationary_tol=a.tol,
            stationary_evals=a.evals, info=fi,
        )  # fmt: skip
        full.append({**performance(job, lam_s), "seconds": time.perf_counter() - t0,
                     "grad_norm": fi["stationarity"]["grad_norm_after"]})  # fmt: skip
        log(f"full retrain seed {seed}: {full[-1]}")
    ed, re, co = performance(job, edited), performance(job, retrained), performance(job, control)
    d_edit, d_re, d_co = (x["target_loss"] - base["target_loss"] for x in (ed, re, co))
    accs = [f["test_acc"] for f in full]
    row["removal"] = {
        "k": len(flipped),
        "edit": {**ed, "d_target": d_edit, "seconds": t_edit},
        "retrain": {**re, "d_target": d_re, "seconds": t_retrain, **rr.as_dict()},
        "control": {**co, "d_target": d_co, "evaluations": rc.evaluations},
        "edit_over_retrain_d_target": d_edit / d_re if d_re else float("nan"),
        "recovery_target": (d_edit - d_co) / (d_re - d_co) if d_re != d_co else float("nan"),
        "recovery_test_acc": (ed["test_acc"] - co["test_acc"]) / (re["test_acc"] - co["test_acc"])
        if re["test_acc"] != co["test_acc"]
        else float("nan"),
        "edit_acc_gap_to_retrain": abs(ed["test_acc"] - re["test_acc"]),
        "full_retrains": full,
        "full_retrain_acc_spread": (max(accs) - min(accs)) if accs else float("nan"),
        "full_retrain_acc_std": statistics.pstdev(accs) if len(accs) > 1 else float("nan"),
    }
    log(f"removal: {json.dumps(row['removal'], default=float)[:800]}")
    row["loo"] = loo.tolist()
    row["scores"] = res.scores.tolist()
    row["reference_scores"] = ref.scores.tolist()
    row["flipped"] = flipped
    row["loo_details"] = details
    write_row(a.out / f"job_fidelity-{tag}.json", row)
    return 0


def write_row(path: Path, row: dict[str, Any]) -> None:
    """``row`` with the machine and versions (``machine_info``), as indented JSON at ``path``."""
    row.update(machine_info())
    path.write_text(json.dumps(row, indent=1, default=float))
    log(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
