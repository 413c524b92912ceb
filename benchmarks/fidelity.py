"""Fidelity and speed of influence against retraining (issue 6): the paper's protocols plus the
checks its reviewers asked for, on small MLP MAMLs where dense Newton retraining is affordable.

Protocols (all results under ``benchmarks/results/fidelity*``):

- (a) tasks: 20% of the training tasks get deranged support labels; each method ranks tasks,
  the 40% most harmful are removed, and the meta-parameters are *edited* (``mf.edit``: one
  solve; and gradient-ascent unlearning) and *retrained* (warm Newton from ``λ*``, and full
  retraining from the same initialisation); accuracy on held-out test tasks and wall time.
- (b) the same for support points and query points (20% of points flipped per task).
- (c) flipped-label detection: AUC and recall against the fraction inspected, every method.
- (d) predicted vs actual ``Δf`` for every training task (``M ≥ 50``), for each curvature ×
  solver, against plain warm-started leave-one-out and the proximal response (δ' = 0.01, 0.1);
  LDS over random half-subsets; Neumann depth × damping ablation; point-level fidelity; and the
  map of when influence tracks retraining (inner map × damping × hidden width × M) with the
  speed-up of influence over full retraining as a function of ``M``.

Data: the embedded glyph dataset (``mf.data.load("glyphs")``) average-pooled to 4×4 = 16
features (so that P ≈ 100–300 and dense Newton retraining is cheap), or ``--data kind:path``
for a user copy of Omniglot / miniImageNet (same pooling); ``--data synthetic`` gives
Omniglot-shaped random-prototype tasks without any dataset.

    python benchmarks/fidelity.py            # default, ≤ 15 min on 2 cores
    python benchmarks/fidelity.py --quick    # smoke run
    python benchmarks/fidelity.py --tasks 100 --hidden 16 --map-full   # bigger
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from harness import RESULTS_DIR, machine_info  # noqa: E402
from metafluence.evaluate import baselines as bl  # noqa: E402
from metafluence.evaluate import detection as det  # noqa: E402
from metafluence.evaluate import plots  # noqa: E402

warnings.filterwarnings("ignore")
DT = torch.float64
OUT = RESULTS_DIR
ROWS: dict[str, list[dict[str, Any]]] = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rec(table: str, **row: Any) -> None:
    ROWS.setdefault(table, []).append(row)


# --- data ---------------------------------------------------------------------------------------
def _pool(x: torch.Tensor, side: int) -> torch.Tensor:
    x = x.to(DT)
    if x.dim() == 4:
        x = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), side).flatten(1)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


def load_tasks(args, M: int, n_target: int, n_test: int, seed: int):
    ways, shots, queries = args.ways, args.shots, args.queries
    if args.data == "toy":
        return tuple(
            toy_tasks(args, n, seed + j, j * 10**6) for j, n in enumerate((M, n_target, n_test))
        )
    if args.data == "synthetic":
        g = torch.Generator().manual_seed(1234)
        protos = torch.randn(200, 1, 28, 28, generator=g, dtype=DT)

        def make(n, s, first):
            out = []
            for i in range(n):
                gg = torch.Generator().manual_seed(s * 100003 + i)
                cls = torch.randperm(200, generator=gg)[:ways]

                def draw(k):
                    x = protos[cls].repeat_interleave(k, 0)
                    return x + 0.8 * torch.randn(x.shape, generator=gg, dtype=DT)

                ys, yq = (
                    torch.arange(ways).repeat_interleave(shots),
                    torch.arange(ways).repeat_interleave(queries),
                )
                out.append(
                    mf.Task(support=(draw(shots), ys), query=(draw(queries), yq), id=first + i)
                )
            return out

        raw = make(M, seed, 0), make(n_target, seed + 1, 10**6), make(n_test, seed + 2, 2 * 10**6)
    else:
        ds = mf.data.load(args.data, **({"strict": False} if args.subset else {}))
        raw = (
            mf.data.sample_tasks(ds, ways, shots, queries, M, seed=seed, split="train"),
            mf.data.sample_tasks(ds, ways, shots, queries, n_target, seed=seed, split="val"),
            mf.data.sample_tasks(ds, ways, shots, queries, n_test, seed=seed, split="test"),
        )

    def feat(ts):
        return [
            mf.Task(
                support=(_pool(t.support[0], args.side), t.support[1]),
                query=(_pool(t.query[0], args.side), t.query[1]),
                id=t.id,
                meta=t.meta,
            )
            for t in ts
        ]

    return tuple(feat(r) for r in raw)


def toy_tasks(args, n: int, seed: int, first: int) -> list:
    """Low-dimensional task family (as in tests/influence/test_retraining.py): task ``k`` labels
    ``x ∈ R^d`` by ``argmax_c x·w_c`` with ``w = w0 + 0.7·noise``; ``ways·shots`` support and
    ``ways·queries`` query points, all drawn N(0, I)."""
    g0 = torch.Generator().manual_seed(4321)
    w0 = 1.5 * torch.randn(args.ways, args.dim, generator=g0, dtype=DT)
    if args.ways == 2:
        w0[1] = -w0[0]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w = w0 + 0.7 * torch.randn(w0.shape, generator=g, dtype=DT)
        xs = torch.randn(args.ways * args.shots, args.dim, generator=g, dtype=DT)
        xq = torch.randn(args.ways * args.queries, args.dim, generator=g, dtype=DT)
        out.append(
            mf.Task(
                support=(xs, (xs @ w.T).argmax(-1)), query=(xq, (xq @ w.T).argmax(-1)), id=first + i
            )
        )
    return out


# --- problems -----------------------------------------------------------------------------------
def build(args, hidden: int, inner: str, damping: float, seed: int = 0):
    torch.manual_seed(seed)
    d = args.dim if args.data == "toy" else args.side * args.side
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, args.ways)).to(DT)
    if inner == "unrolled":
        im = mf.inner.Unrolled(steps=1, lr=args.inner_lr)
    else:
        # gradient steps of size 1/(γ + 2): stable for the proximal term (γ·lr < 2)
        gam = args.implicit_reg
        im = mf.inner.Implicit(reg=gam, solver="direct", steps=50, lr=1.0 / (gam + 2.0))
    return model, mf.MetaProblem(model, inner=im, damping=damping)


TRAIN = {"adam_steps": 300, "adam_lr": 0.05, "lbfgs_steps": 30}


def train(prob, model, tasks, init=None):
    """The fixed stopping rule (as tests/influence/test_retraining.py): Adam (300 steps, lr
    0.05), then L-BFGS (≤ 30 outer iterations, tol 1e-9), then dense Newton to ‖∇F‖ ≤ 1e-12
    (≤ 30 steps). A Newton-only finish from an Adam start stalls (fidelity.md, ‖∇F‖ 0.88)."""
    t0 = time.perf_counter()
    lam = mf.train.meta_train(
        prob, model, tasks, steps=TRAIN["adam_steps"], outer_lr=TRAIN["adam_lr"], init=init
    )
    lam = mf.train.meta_train(
        prob,
        None,
        tasks,
        steps=TRAIN["lbfgs_steps"],
        outer_lr=1.0,
        optimizer="lbfgs",
        init=lam,
        tol=1e-9,
    )
    lam = mf.train.newton_refine(prob, lam, tasks, tol=1e-12, max_steps=30)
    return lam, time.perf_counter() - t0


def accuracy(prob, lam, tasks) -> float:
    pt = prob.point(lam, tasks)
    th = pt.adapted().detach()
    b = pt.batch
    with torch.no_grad():
        lg = vmap(prob.fm.logits)(th, b.xq)
    return float((lg.argmax(-1) == b.yq).double().mean())


def influence(
    prob,
    lam,
    tasks,
    target,
    items="task",
    curvature="exact",
    solver="direct",
    solve_damping=0.0,
    **kw,
):
    t0 = time.perf_counter()
    res = mf.removal_effects(
        prob,
        lam,
        tasks,
        target=target,
        items=items,
        curvature=curvature,
        solver=solver,
        solve_damping=solve_damping,
        **kw,
    )
    return res, time.perf_counter() - t0


def check_columns(diag: dict[str, Any]) -> dict[str, Any]:
    """The Newton regime check's statistics (influence/regime.py) as table columns."""
    chk = diag.get("newton_check") or {}
    res = chk.get("residual") or [float("nan")]
    return {
        "newton_shift": chk.get("shift", float("nan")),
        "newton_scale": chk.get("scale", float("nan")),
        "newton_expected_spearman": chk.get("expected_spearman", float("nan")),
        "newton_residual": float(torch.tensor(res).median()),
        "newton_residual_max": float(torch.tensor(res).max()),
        "newton_nonlinear": chk.get("nonlinear", ""),  # the check's verdict
        # how many of its retrains ended above RETRAIN_RESIDUAL, of how many checked
        "newton_unfinished": chk.get("retrains_unfinished", ""),
        "newton_checked": len(chk.get("residual") or []),
    }


def method_scores(prob, lam, tasks, target, kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    res, t = influence(prob, lam, tasks, target, items=kind, diagnostics=False)
    out["influence (ours)"] = (res.scores, t)
    for name in ("direct_if", "ekfac_if", "tracin", "loss", "random"):
        t0 = time.perf_counter()
        s = bl.score_all(prob, lam, tasks, target, methods=[name])[name]
        out[name] = (s[kind], time.perf_counter() - t0)
    return out


def most_harmful(scores, kind: str, frac: float) -> list[Any]:
    if kind == "task":
        k = int(round(frac * scores.numel()))
        return torch.argsort(scores, stable=True)[:k].tolist()
    flat = [(float(v), i, j) for i, row in enumerate(scores) for j, v in enumerate(row.tolist())]
    flat.sort()
    k = int(round(frac * len(flat)))
    return [(i, j) for _, i, j in flat[:k]]


# --- (a)(b)(c) ----------------------------------------------------------------------------------
def protocol_removal(args, kind: str, level: str, where: str):
    log(f"protocol ({'a' if kind == 'task' else 'b'}) items={kind} flip={level}/{where}")
    tasks, target, test = load_tasks(args, args.tasks, args.target, args.test, seed=11)
    tasks, mask = mf.data.flip_labels(
        tasks, fraction=args.flip, level=level, seed=0, where=where, ways=args.ways
    )
    model, prob = build(args, args.hidden, "unrolled", args.damping)
    init = prob.init_params()
    lam, t_train = train(prob, model, tasks)
    base_acc = accuracy(prob, lam, test)
    log(f"  trained in {t_train:.1f} s, ‖∇F‖={mf.train.grad_norm(prob, lam, tasks):.2e}")
    rec(
        "removal",
        kind=kind,
        where=where,
        method="none (trained on all)",
        acc_edit=base_acc,
        acc_warm_retrain=base_acc,
        acc_full_retrain=base_acc,
        t_score_s=0,
        t_edit_s=0,
        t_warm_s=0,
        t_full_s=t_train,
        speedup_vs_full=1.0,
        removed=0,
    )
    scores = method_scores(prob, lam, tasks, target, kind)
    curves = {}
    for name, (s, t_s) in scores.items():
        if kind == "task":
            flipped = mask
        else:
            flipped = mask if isinstance(mask, list) else None
        if flipped is not None:
            curves[name] = det.detection_curve(s, flipped)
            sm = det.summary(s, flipped)
            rec("detection", kind=kind, where=where, method=name, **sm, t_score_s=t_s)
        R = most_harmful(s, kind, 0.4)
        remove = {kind: R}
        t0 = time.perf_counter()
        edited = mf.edit(prob, lam, tasks, remove=remove, solver="direct")
        t_edit = time.perf_counter() - t0
        t0 = time.perf_counter()
        edited2 = mf.edit(prob, lam, tasks, remove=remove, solver="direct", newton_steps=2)
        t_edit2 = time.perf_counter() - t0
        asc = bl.gradient_ascent_unlearn(prob, lam, tasks, remove, steps=5, lr=args.ascent_lr)
        kept = mf.evaluate.group_reweighted(prob.batch(tasks, prob.flat(lam)), remove)
        t0 = time.perf_counter()
        warm = mf.train.newton_refine(prob, lam, kept, tol=1e-10, max_steps=20)
        t_warm = time.perf_counter() - t0
        full_acc, t_full = float("nan"), float("nan")
        if args.full_retrain or name in ("influence (ours)", "random"):
            full, t_full = train(prob, model, kept, init=init)
            full_acc = accuracy(prob, full, test)
        truly = sum(bool(mask[e]) if kind == "task" else bool(mask[e[0]][e[1]]) for e in R)
        rec(
            "removal",
            kind=kind,
            where=where,
            method=name,
            acc_edit=accuracy(prob, edited, test),
            acc_edit_newton2=accuracy(prob, edited2, test),
            acc_ascent=accuracy(prob, asc, test),
            acc_warm_retrain=accuracy(prob, warm, test),
            acc_full_retrain=full_acc,
            t_score_s=t_s,
            t_edit_s=t_edit,
            t_warm_s=t_warm,
            t_full_s=t_full,
            t_edit_newton2_s=t_edit2,
            speedup_vs_full=(t_full / (t_s + t_edit)) if t_full == t_full else float("nan"),
            removed=len(R),
            removed_flipped=truly,
        )
        log(
            f"  {name}: edit acc {accuracy(prob, edited, test):.4f} "
            f"(+2 Newton {accuracy(prob, edited2, test):.4f}) warm "
            f"{accuracy(prob, warm, test):.4f} full {full_acc:.4f} (base {base_acc:.4f})"
        )
        checkpoint(args)
    if curves:
        plots.detection_plot(
            curves,
            OUT / f"fidelity_detection_{kind}_{where}.png",
            title=f"flipped {where} labels: {kind} detection",
        )


# --- (d) ----------------------------------------------------------------------------------------
def d_problem(args):
    """The (d) problem: M tasks (20% support-flipped), target and test tasks, trained λ*."""
    tasks, target, test = load_tasks(args, args.tasks, args.target, args.test, seed=21)
    tasks, mask = mf.data.flip_labels(
        tasks, fraction=args.flip, level="task", seed=1, where="support", ways=args.ways
    )
    model, prob = build(args, args.hidden, "unrolled", args.damping)
    lam, t_train = train(prob, model, tasks)
    return tasks, mask, target, test, prob, lam, t_train


def protocol_fidelity(args):
    log(f"protocol (d): M={args.tasks} tasks, LOO ground truth")
    tasks, mask, target, test, prob, lam, t_train = d_problem(args)
    gn = mf.train.grad_norm(prob, lam, tasks)
    log(f"  trained in {t_train:.1f} s, P={prob.spec.size}, ‖∇F‖={gn:.2e}")
    idx = list(range(len(tasks)))
    truths: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    truths["plain LOO"] = mf.evaluate.leave_one_out(prob, lam, tasks, target, indices=idx)
    t_loo = (time.perf_counter() - t0) / len(idx)
    for dp in (0.01, 0.1):
        truths[f"proximal δ'={dp}"] = mf.evaluate.leave_one_out(
            prob,
            lam,
            tasks,
            target,
            indices=idx,
            retrain=mf.evaluate.newton_retrain(prob, proximal=dp),
        )
    log(f"  LOO done ({t_loo:.2f} s per plain retrain), ‖∇F‖={gn:.2e}")
    for k in idx:
        rec(
            "truths",
            task=k,
            flipped=bool(torch.as_tensor(mask)[k]),
            **{tn: float(tv[k]) for tn, tv in truths.items()},
        )
    rec(
        "setup",
        M=len(tasks),
        P=prob.spec.size,
        grad_norm=gn,
        t_train_s=t_train,
        t_plain_retrain_s=t_loo,
        n_flipped=int(torch.as_tensor(mask).sum()),
        acc_test=accuracy(prob, lam, test),
    )
    checkpoint(args)
    scat = {}
    for curv in args.curvatures.split(","):
        for solver in args.solvers.split(","):
            for dp in (0.0, 0.01, 0.1):
                kw: dict[str, Any] = {"lanczos_steps": 60, "newton_check": 8}
                if solver == "neumann":
                    kw["solver_kwargs"] = {"maxiter": 200}
                elif solver == "cg":
                    kw["solver_kwargs"] = {"maxiter": 300}
                elif solver == "arnoldi":
                    kw["solver_kwargs"] = {"rank": 30}
                try:
                    res, t = influence(
                        prob,
                        lam,
                        tasks,
                        target,
                        curvature=curv,
                        solver=solver,
                        solve_damping=dp,
                        **kw,
                    )
                except Exception as exc:  # record, keep going
                    log(f"  {curv}/{solver}/δ'={dp} failed: {exc!r}")
                    continue
                dg = res.diagnostics
                row = {
                    "curvature": curv,
                    "solver": solver,
                    "solve_damping": dp,
                    "t_s": t,
                    "converged": bool(res.solve.converged),
                    "lambda_min": dg.get("lambda_min", float("nan")),
                    "lambda_max": dg.get("lambda_max", float("nan")),
                    "regime": dg.get("regime", ""),
                    **check_columns(dg),
                }
                for tn, tv in truths.items():
                    c = mf.evaluate.correlation(res.scores, tv)
                    row[f"spearman[{tn}]"] = c["spearman"]
                    row[f"pearson[{tn}]"] = c["pearson"]
                    row[f"relerr[{tn}]"] = c["rel_error"]
                rec("tasks", M=len(tasks), P=prob.spec.size, grad_norm=gn, **row)
                if curv == "exact" and solver == "direct":
                    tn = "plain LOO" if dp == 0 else f"proximal δ'={dp}"
                    scat[f"exact/direct δ'={dp} vs {tn}"] = (res.scores, truths[tn])
            checkpoint(args)
        log(f"  curvature {curv} done")
    for name in ("direct_if", "ekfac_if", "tracin"):
        s = bl.score_all(prob, lam, tasks, target, methods=[name])[name].task
        row = {"curvature": name, "solver": "-", "solve_damping": 0.0}
        for tn, tv in truths.items():
            c = mf.evaluate.correlation(s, tv)
            row[f"spearman[{tn}]"] = c["spearman"]
            row[f"pearson[{tn}]"] = c["pearson"]
        rec("tasks", M=len(tasks), P=prob.spec.size, grad_norm=gn, **row)
    plots.scatter_pred_vs_actual(
        scat,
        OUT / "fidelity_scatter_tasks.png",
        title=f"task removal, M={len(tasks)}, P={prob.spec.size}",
    )
    checkpoint(args)
    if args.d_main_only:
        return
    # Δλ relative error for a few single removals and one 10% group
    for grp in ([0], [1], list(range(0, len(tasks), 10))):
        for dp in (0.0, 0.1):
            pred = prob.spec.flatten(
                mf.param_influence(
                    prob, lam, tasks, {"task": grp}, solver="direct", solve_damping=dp
                )
            )
            rt = None if dp == 0 else mf.evaluate.newton_retrain(prob, proximal=dp)
            df, dl = mf.evaluate.leave_group_out(
                prob, lam, tasks, target, [grp], items="task", retrain=rt, return_params=True
            )
            pf = mf.evaluate.predicted_group_effects(
                influence(prob, lam, tasks, target, solve_damping=dp, diagnostics=False)[0].scores,
                [grp],
                items="task",
            )
            rec(
                "relerr",
                group_size=len(grp),
                solve_damping=dp,
                relerr_dlambda=mf.evaluate.relative_error(pred, dl[0]),
                relerr_df=mf.evaluate.relative_error(pf, df),
            )
    # LDS over random half-subsets (removed halves; Σ removed scores; proximal δ'=0.1 truth
    # and plain retraining)
    subsets = mf.evaluate.random_subsets(len(tasks), args.lds_subsets, 0.5, seed=0)
    groups = [r.tolist() for r in subsets]
    for dp in (0.0, 0.1):
        rt = None if dp == 0 else mf.evaluate.newton_retrain(prob, proximal=dp)
        gt = mf.evaluate.leave_group_out(prob, lam, tasks, target, groups, items="task", retrain=rt)
        for sdp in (0.0, 0.1):
            s = influence(prob, lam, tasks, target, solve_damping=sdp, diagnostics=False)[0]
            rec(
                "lds",
                truth=("plain" if dp == 0 else f"proximal δ'={dp}"),
                solve_damping=sdp,
                n_subsets=len(groups),
                **{"lds": mf.evaluate.lds(s.scores, gt, subsets)["lds"]},
            )
        for name in ("tracin", "direct_if"):
            s = bl.score_all(prob, lam, tasks, target, methods=[name])[name].task
            rec(
                "lds",
                truth=("plain" if dp == 0 else f"proximal δ'={dp}"),
                solve_damping=name,
                n_subsets=len(groups),
                lds=mf.evaluate.lds(s, gt, subsets)["lds"],
            )
    log("  LDS done")
    # Neumann depth × damping ablation
    for depth in (5, 20, 80, 320):
        for dp in (0.0, 0.01, 0.1):
            res, t = influence(
                prob,
                lam,
                tasks,
                target,
                solver="neumann",
                solve_damping=dp,
                diagnostics=False,
                solver_kwargs={"maxiter": depth, "rtol": 1e-14},
            )
            tn = "plain LOO" if dp == 0 else f"proximal δ'={dp}"
            c = mf.evaluate.correlation(res.scores, truths[tn])
            rec(
                "neumann",
                depth=depth,
                solve_damping=dp,
                t_s=t,
                spearman=c["spearman"],
                rel_error=c["rel_error"],
                residual=float(res.solve.residual.max()),
                spearman_plain=mf.evaluate.correlation(res.scores, truths["plain LOO"])["spearman"],
            )
    rows = [r for r in ROWS["neumann"]]
    plots.line_plot(
        [4 * 0 + r for r in (5, 20, 80, 320)],
        {
            f"δ'={dp}": [r["spearman"] for r in rows if r["solve_damping"] == dp]
            for dp in (0.0, 0.01, 0.1)
        },
        OUT / "fidelity_neumann.png",
        "Neumann depth",
        "Spearman vs matching truth",
        "Neumann depth × damping",
        logx=True,
    )
    log("  Neumann ablation done")
    scat.update(point_fidelity(args, prob, lam, tasks, target))


def point_fidelity(args, prob, lam, tasks, target) -> dict[str, tuple]:
    """Support and query points (``args.points`` random ones of each kind): influence at
    δ' ∈ {0, 0.01, 0.1} against plain LOO and the proximal response at the same δ'."""
    scat: dict[str, tuple] = {}
    for kind in ("support_point", "query_point"):
        b = prob.batch(tasks, prob.flat(lam))
        size = b.n_support if kind == "support_point" else b.n_query
        g = torch.Generator().manual_seed(3)
        pts = [
            (int(k), int(j))
            for k, j in zip(
                torch.randint(len(tasks), (args.points,), generator=g).tolist(),
                torch.randint(size, (args.points,), generator=g).tolist(),
                strict=True,
            )
        ]
        pts = sorted(set(pts))
        for dp in (0.0, 0.01, 0.1):
            rt = None if dp == 0 else mf.evaluate.newton_retrain(prob, proximal=dp)
            t0 = time.perf_counter()
            tv = mf.evaluate.leave_one_out(
                prob, lam, tasks, target, items=kind, indices=pts, retrain=rt
            )
            t_loo = time.perf_counter() - t0
            # query points are linear in their weights: the exact response is the same
            for resp in ("linear", "exact") if kind == "support_point" else ("linear",):
                res, t_inf = influence(
                    prob,
                    lam,
                    tasks,
                    target,
                    items=kind,
                    solve_damping=dp,
                    support_response=resp,
                    newton_check=8,
                    lanczos_steps=20,
                )
                pred = torch.stack([res.scores[k][j] for k, j in pts])
                c = mf.evaluate.correlation(pred, tv)
                rec(
                    "points",
                    kind=kind,
                    response=resp,
                    n=len(pts),
                    truth="plain" if dp == 0 else f"proximal δ'={dp}",
                    spearman=c["spearman"],
                    pearson=c["pearson"],
                    rel_error=c["rel_error"],
                    **check_columns(res.diagnostics),
                    regime=res.diagnostics.get("regime"),
                    t_retrain_per_point_s=t_loo / len(pts),
                    t_influence_all_points_s=t_inf,
                    n_points_scored=sum(len(r) for r in res.scores),
                )
                log(f"  {kind} {resp} δ'={dp}: ρ={c['spearman']:.3f} (n={len(pts)})")
                if dp == 0.1:
                    scat[f"{kind} {resp} δ'=0.1"] = (pred, tv)
            checkpoint(args)
    log("  point fidelity done")
    return scat


def protocol_points(args):
    """Point-level fidelity alone, on the (d) problem (same tasks, flips and λ*)."""
    log(f"points: M={args.tasks} tasks, {args.points} random points of each kind")
    tasks, _, target, _, prob, lam, t_train = d_problem(args)
    log(f"  trained in {t_train:.1f} s, P={prob.spec.size}")
    point_fidelity(args, prob, lam, tasks, target)


# --- Newton-type corrections per removed item ---------------------------------------------------
def protocol_corrections(args):
    """Does a per-item correction close the gap to plain LOO? Same setup as (d).

    Predictors of ``Δf_{-k}`` (each against the matching truth, δ' ∈ {0, 0.01, 0.1}):
    influence (first order); ``f(λ* + Δλ_k) − f(λ*)`` with the influence ``Δλ_k`` (exact ``f``,
    M target evaluations); 1 and 2 dense Newton steps on the reweighted objective from ``λ*``
    (the retrainer stopped early: cost ≈ steps / (steps of a full retrain))."""
    log("corrections: per-item Newton steps vs influence")
    tasks, _, target, _, prob, lam, _ = d_problem(args)
    lamf = prob.flat(lam)
    idx = list(range(len(tasks)))
    f0 = mf.evaluate.target_value(prob, lamf, target)
    batch = prob.batch(tasks, lamf)
    for dp in (0.0, 0.01, 0.1):
        t0 = time.perf_counter()
        truth = mf.evaluate.leave_one_out(
            prob,
            lam,
            tasks,
            target,
            indices=idx,
            retrain=mf.evaluate.newton_retrain(prob, proximal=dp),
        )
        t_truth = (time.perf_counter() - t0) / len(idx)
        tn = "plain LOO" if dp == 0 else f"proximal δ'={dp}"
        preds: dict[str, tuple[torch.Tensor, float]] = {}
        res, t = influence(
            prob, lam, tasks, target, solver="direct", solve_damping=dp, diagnostics=False
        )
        preds["influence (first order)"] = (res.scores, t / len(idx))
        t0 = time.perf_counter()
        out = []
        for k in idx:
            dl = prob.spec.flatten(
                mf.param_influence(
                    prob, lam, tasks, {"task": [k]}, solver="direct", solve_damping=dp
                )
            )
            out.append(mf.evaluate.target_value(prob, lamf + dl, target) - f0)
        preds["influence Δλ, exact f"] = (
            torch.tensor(out, dtype=DT),
            (time.perf_counter() - t0) / len(idx),
        )
        for steps in (1, 2):
            t0 = time.perf_counter()
            out = []
            for k in idx:
                b = mf.evaluate.reweighted(batch, "task", k, 0.0)
                prox = (dp, lamf) if dp > 0 else None
                new = mf.train.newton_refine(prob, lam, b, tol=0.0, max_steps=steps, prox=prox)
                out.append(mf.evaluate.target_value(prob, new, target) - f0)
            preds[f"{steps} Newton step(s), H_-k"] = (
                torch.tensor(out, dtype=DT),
                (time.perf_counter() - t0) / len(idx),
            )
        for name, (pv, tp) in preds.items():
            c = mf.evaluate.correlation(pv, truth)
            rec(
                "corrections",
                truth=tn,
                predictor=name,
                spearman=c["spearman"],
                pearson=c["pearson"],
                rel_error=c["rel_error"],
                t_per_item_s=tp,
                t_retrain_per_item_s=t_truth,
            )
            log(f"  {tn}: {name} ρ={c['spearman']:.3f} rel {c['rel_error']:.3f}")
        checkpoint(args)


# --- the map ------------------------------------------------------------------------------------
def protocol_map(args):
    log("map: inner × damping × width × M")
    inners = tuple(args.map_inners.split(","))
    widths = (4, 8, 16) if args.map_full else (args.hidden,)
    Ms = tuple(int(m) for m in args.map_ms.split(","))
    dampings = tuple(float(d) for d in args.map_dampings.split(","))
    for inner in inners:
        for width in widths:
            for M in Ms:
                tasks, target, _ = load_tasks(args, M, args.target, 2, seed=31)
                for damping in dampings:
                    try:
                        map_cell(args, inner, width, M, damping, tasks, target)
                    except Exception as exc:  # e.g. Implicit: inner Hessian not PD
                        log(f"  {inner} w={width} M={M} δ={damping} failed: {exc!r}")
                        rec("map", inner=inner, width=width, M=M, damping=damping, regime=repr(exc))
                    checkpoint(args)


def map_cell(args, inner, width, M, damping, tasks, target) -> None:
    """One cell of the map: train, LOO on a subset of tasks, influence, record."""
    model, prob = build(args, width, inner, damping)
    lam, t_train = train(prob, model, tasks)
    gn = mf.train.grad_norm(prob, lam, tasks)
    idx = list(range(0, M, max(1, M // args.map_items)))[: args.map_items]
    plain = mf.evaluate.leave_one_out(prob, lam, tasks, target, indices=idx)
    prox = mf.evaluate.leave_one_out(
        prob,
        lam,
        tasks,
        target,
        indices=idx,
        retrain=mf.evaluate.newton_retrain(prob, proximal=0.1),
    )
    r0, t0 = influence(prob, lam, tasks, target, lanczos_steps=40, newton_check=8)
    r1, _ = influence(prob, lam, tasks, target, solve_damping=0.1, diagnostics=False)
    t1 = time.perf_counter()
    mf.edit(prob, lam, tasks, remove={"task": idx[:1]}, solver="direct")
    t_edit = time.perf_counter() - t1
    s0, s1 = r0.scores[idx], r1.scores[idx]
    rec(
        "map",
        inner=inner,
        width=width,
        P=prob.spec.size,
        M=M,
        damping=damping,
        grad_norm=gn,
        lambda_min=r0.diagnostics["lambda_min"],
        lambda_max=r0.diagnostics["lambda_max"],
        regime=r0.diagnostics["regime"],
        condition=r0.diagnostics.get("condition", float("nan")),
        **check_columns(r0.diagnostics),
        spearman_plain=mf.evaluate.correlation(s0, plain)["spearman"],
        relerr_plain=mf.evaluate.correlation(s0, plain)["rel_error"],
        spearman_prox01=mf.evaluate.correlation(s1, prox)["spearman"],
        t_train_s=t_train,
        t_influence_s=t0,
        t_edit_s=t_edit,
        speedup=t_train / (t0 + t_edit),
        n_items=len(idx),
    )
    log(
        f"  {inner} w={width} M={M} δ={damping}: {ROWS['map'][-1]['regime']} "
        f"ρ_plain={ROWS['map'][-1]['spearman_plain']:.3f} "
        f"ρ_prox={ROWS['map'][-1]['spearman_prox01']:.3f}"
    )


# --- output -------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.4g}")
    return str(v)


def _num(v: str) -> Any:
    try:
        return float(v) if any(ch in v for ch in ".e") else v
    except ValueError:
        return v


START = time.perf_counter()


def checkpoint(args) -> None:
    write(args, time.perf_counter() - START)


def write(args, wall: float) -> None:
    import csv

    info = machine_info()
    for name, rows in ROWS.items():
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        with (OUT / f"fidelity_{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    lines = [
        "# Fidelity of influence against retraining (issue 6)",
        "",
        f"Generated by `python benchmarks/fidelity.py {' '.join(sys.argv[1:])}` in "
        f"{wall / 60:.1f} min.",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        (
            f"Data: toy {args.dim}-d linear-boundary tasks; {args.ways}-way "
            if args.data == "toy"
            else f"Data: {args.data} pooled to {args.side}×{args.side}; {args.ways}-way "
        )
        + f"{args.shots}-shot, {args.queries} queries/class; MLP width {args.hidden}, "
        f"one-step second-order MAML (inner lr {args.inner_lr}), damping δ={args.damping}, "
        "float64. Scores are removal effects Δf (math.md §3: negative = harmful).",
        "",
    ]
    # every table in OUT (also those written by earlier runs with other --only)
    for path in sorted(OUT.glob("fidelity_*.csv")):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        keys = list(rows[0])
        fresh = "" if path.stem[len("fidelity_") :] in ROWS else " (earlier run)"
        lines += [
            f"## {path.stem[len('fidelity_') :]}{fresh}",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        lines += ["| " + " | ".join(_fmt(_num(r.get(k, ""))) for k in keys) + " |" for r in rows]
        lines.append("")
    (OUT / "fidelity_tables.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="glyphs", help="glyphs | synthetic | toy | kind:path")
    ap.add_argument(
        "--subset", action="store_true", help="kind:path holds part of the dataset (strict=False)"
    )
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--target", type=int, default=20)
    ap.add_argument("--test", type=int, default=50)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--side", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=4)
    ap.add_argument("--inner-lr", type=float, default=0.5)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--flip", type=float, default=0.2)
    ap.add_argument("--ascent-lr", type=float, default=0.5)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--lds-subsets", type=int, default=10)
    ap.add_argument("--map-items", type=int, default=8)
    ap.add_argument("--map-full", action="store_true", help="widths 4, 8, 16")
    ap.add_argument("--map-ms", default="20,50,100")
    ap.add_argument("--map-inners", default="unrolled,implicit")
    ap.add_argument("--implicit-reg", type=float, default=3.0, help="Implicit(reg=γ)")
    ap.add_argument("--map-dampings", default="1e-3,1e-2,1e-1")
    ap.add_argument("--full-retrain", action="store_true", help="full retrain for every method")
    ap.add_argument("--only", default="d,a,c,b,map")
    ap.add_argument("--dim", type=int, default=2, help="input dimension for --data toy")
    ap.add_argument("--curvatures", default="exact,gauss_newton,gamma")
    ap.add_argument("--solvers", default="cg,direct,neumann,arnoldi")
    ap.add_argument("--d-main-only", action="store_true", help="(d): only curvature × solver")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS_DIR), help="output folder")
    args = ap.parse_args()
    global OUT
    OUT = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tasks, args.test, args.points, args.lds_subsets, args.map_items = 20, 30, 10, 6, 4
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    steps = [
        ("d", lambda: protocol_fidelity(args)),
        ("a", lambda: protocol_removal(args, "task", "task", "support")),
        ("aq", lambda: protocol_removal(args, "task", "task", "query")),
        ("corr", lambda: protocol_corrections(args)),
        ("points", lambda: protocol_points(args)),
        ("b", lambda: protocol_removal(args, "support_point", "point", "support")),
        ("b", lambda: protocol_removal(args, "query_point", "point", "query")),
        ("map", lambda: protocol_map(args)),
    ]
    for key, fn in steps:
        if key in only or (key == "a" and "c" in only):
            fn()
            write(args, time.perf_counter() - t0)  # partial results survive a timeout
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
