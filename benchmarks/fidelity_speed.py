"""Fidelity and speed of influence editing against retraining on the problem of ``metafluence
run`` (issue 6): accuracy gap and speed-up as a function of the number of tasks ``M``.

The problem is the main job's (``metafluence.report.job.RunConfig`` defaults): embedded glyph
data, 5-way 1-shot tasks with 5 queries per class, Conv-4 width 32 (stride pooling), the job's
ANIL inner map (head-only, one step of size 0.5), float32, 1 thread, damping 1e-3; target = the
mean post-adaptation query loss of 40 val-split tasks, test = 40 test-split tasks.

For each ``M`` and each training rule:

- tasks: 20% of the ``M`` tasks get deranged support labels (``mf.data.flip_labels``); train
  (``λ*``); score every task with ``mf.removal_effects`` (the job's Gauss–Newton curvature, CG
  with ``maxiter`` 15, solve damping 1.0; ``diagnostics=False``: the scores alone, timed as
  ``t_score``; at the ``--diag-M`` sizes the job's call with diagnostics — 10 Lanczos steps and
  the library's defaults — is timed too, as ``t_score_diag``); remove the 40% most harmful;
  ``mf.edit`` (one more solve); full retrain without them from the same initialisation and seed
  with the same rule; warm retrain from ``λ*`` (the job's ``retrain_steps`` Adam steps,
  seed + 1, as the job does).
- support / query points: the clean tasks with 20% of the support points and (independently)
  20% of the query points flipped to another class (``level="point"``): one base training and
  one ``removal_effects`` call give the scores of both kinds; for each kind the 40% most harmful
  points of that kind are removed (weight 0, as the scores define removal), edited, and fully
  retrained (same init, seed and rule, with those weights 0).

Speed-up = ``t_full / (t_score + t_edit)``: the wall time of full retraining over the time the
influence route needs to produce the edited model (scores + edit; the base training is common to
both routes). Accuracy gap = test accuracy of the edit minus that of the full retrain.

Training rules (``--rules``):

- ``job``: the job's schedule, Adam ``steps`` = 150 at ``outer_lr`` 3e-3 on mini-batches of
  ``meta_batch`` = 32 tasks: a fixed number of steps, whatever ``M`` (stopping rule: step
  count; no gradient-norm test).
- ``epochs``: ``ceil(epochs · M / meta_batch)`` Adam steps (a fixed number of passes over the
  tasks, so training grows with the data); ``--epochs`` defaults to 40, the job's
  150·32/120 at its default ``M`` = 120. Warm retraining keeps the job's ``retrain_steps``.

Where the time goes is recorded with each row: ``t_step`` (median seconds per Adam step of the
full retrain) and ``t_hvp`` (median of 3 Gauss–Newton total-Hessian products over all ``M``
tasks at ``λ*``); the scores take ``maxiter`` CG products, the edit another ``maxiter``. Rows
are appended to the CSV after every (rule, M, kind), the plot and README are rewritten after
every ``M``.

    python benchmarks/fidelity_speed.py                      # default (see --help), ≤ 25 min
    python benchmarks/fidelity_speed.py --M 50,100 --rules job,epochs
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from harness import RESULTS_DIR, append_csv, load_note, machine_info  # noqa: E402
from metafluence.evaluate import adapted_performance as evaluate  # noqa: E402
from metafluence.models import build_model  # noqa: E402
from metafluence.report.job import RunConfig, _inner  # noqa: E402

OUT = RESULTS_DIR / "fidelity_speed"
KINDS = ("task", "support_point", "query_point")
RULES = ("job", "epochs")
COLUMNS = [
    "rule",
    "M",
    "kind",
    "P",
    "steps",
    "epochs",
    "n_items",
    "n_flipped",
    "n_removed",
    "removed_flipped",
    "acc_base",
    "acc_edit",
    "acc_full",
    "acc_warm",
    "gap_edit_full",
    "gap_warm_full",
    "acc_full_alt",
    "gap_full_alt",
    "df_pred",
    "df_edit",
    "df_full",
    "t_base",
    "t_score",
    "t_edit",
    "t_full",
    "t_warm",
    "speedup",
    "t_score_diag",
    "speedup_diag",
    "diag_defaults",
    "t_step",
    "t_hvp",
    "cg_iters",
    "lanczos_steps",
    "loadavg_1m",
    "note",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = RunConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--M", default="50,100,200", help="comma-separated numbers of tasks")
    p.add_argument(
        "--points-M", default="50,100", help="the Ms (of --M) at which point kinds also run"
    )
    p.add_argument("--rules", default="job", help="comma-separated of: job, epochs")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated of " + str(KINDS))
    p.add_argument("--epochs", type=float, default=40.0, help="passes over M (epochs rule)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps (job rule)")
    p.add_argument("--retrain-steps", type=int, default=d.retrain_steps)
    p.add_argument("--outer-lr", type=float, default=d.outer_lr)
    p.add_argument("--meta-batch", type=int, default=d.meta_batch)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--target-tasks", type=int, default=d.target_tasks)
    p.add_argument("--eval-tasks", type=int, default=d.eval_tasks)
    p.add_argument("--maxiter", type=int, default=d.maxiter)
    p.add_argument("--lanczos-steps", type=int, default=10, help="as the job (diagnostics)")
    p.add_argument("--noise", type=float, default=d.noise, help="fraction flipped")
    p.add_argument("--remove", type=float, default=0.4, help="fraction removed")
    p.add_argument(
        "--diag-M",
        default="50",
        help="the Ms at which the job's removal_effects call (with diagnostics) is also timed",
    )
    p.add_argument("--hvp-repeat", type=int, default=3)
    p.add_argument(
        "--noise-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also retrain fully with seed + 1 (acc_full_alt): the spread of retraining itself",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--append", action="store_true", help="keep the rows already in the CSV")
    p.add_argument("--plot-only", action="store_true", help="redraw PNG/README from the CSV")
    a = p.parse_args(argv)
    a.Ms = [int(x) for x in a.M.split(",") if x]
    a.points_Ms = {int(x) for x in a.points_M.split(",") if x}
    a.diag_Ms = {int(x) for x in a.diag_M.split(",") if x}
    a.rule_list = [r for r in a.rules.split(",") if r]
    a.kind_list = [k for k in a.kinds.split(",") if k]
    for r in a.rule_list:
        if r not in RULES:
            p.error(f"--rules: {r!r} not in {RULES}")
    for k in a.kind_list:
        if k not in KINDS:
            p.error(f"--kinds: {k!r} not in {KINDS}")
    return a


# --- the job's problem --------------------------------------------------------------------------
class Setup:
    """Data, model and problem as ``metafluence run`` builds them (float32, CPU)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.cfg = RunConfig(width=a.width, seed=a.seed, maxiter=a.maxiter)
        self.ds = mf.data.load_glyphs(num_classes=self.cfg.glyph_classes, seed=0, progress=False)
        self.kw: dict[str, Any] = dict(ways=self.cfg.ways, shots=self.cfg.shots)
        self.kw.update(queries=self.cfg.queries, seed=a.seed)
        self.target = mf.data.sample_tasks(
            self.ds, num_tasks=a.target_tasks, split="val", first_id=10**6, **self.kw
        )
        self.test = mf.data.sample_tasks(
            self.ds, num_tasks=a.eval_tasks, split="test", first_id=2 * 10**6, **self.kw
        )
        c, h, _ = self.ds.image_shape
        self.model = build_model(
            "conv4", self.cfg.ways, c, h, width=a.width, seed=a.seed, pool="stride"
        )
        self.problem = mf.MetaProblem(
            self.model,
            inner=_inner(self.cfg),
            damping=self.cfg.damping,
            chunk_size=self.cfg.chunk_size,
        )
        self.init = self.problem.init_params()

    def tasks(self, M: int) -> list:
        return mf.data.sample_tasks(self.ds, num_tasks=M, split="train", **self.kw)

    def solve_kwargs(self) -> dict[str, Any]:
        return dict(
            curvature=self.cfg.curvature,
            solver=self.cfg.solver,
            solve_damping=self.cfg.solve_damping,
            solver_kwargs={"maxiter": self.cfg.maxiter},
        )

    def train(self, tasks, steps: int, init=None, seed: int | None = None):
        """Adam on mini-batches (the job's meta_train call); returns (λ, seconds, median step)."""
        stamps: list[float] = []
        t0 = time.perf_counter()
        lam = mf.train.meta_train(
            self.problem,
            self.model,
            tasks,
            steps=steps,
            outer_lr=self.a.outer_lr,
            seed=self.a.seed if seed is None else seed,
            optimizer="adam",
            batch_size=self.a.meta_batch,
            init=self.init if init is None else init,
            callback=lambda *_: stamps.append(time.perf_counter()),
        )
        wall = time.perf_counter() - t0
        gaps = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
        return lam, wall, statistics.median(gaps) if gaps else float("nan")

    def scores(self, lam, tasks, items: str, diagnostics: bool = False):
        """Timed ``removal_effects``: the scores alone (``diagnostics=False``: target gradient,
        one solve, one mixed product), or the job's call (diagnostics with ``lanczos_steps``
        and the library's other defaults)."""
        t0 = time.perf_counter()
        res = mf.removal_effects(
            self.problem,
            lam,
            tasks,
            target=self.target,
            items=items,
            diagnostics=diagnostics,
            lanczos_steps=self.a.lanczos_steps,
            **self.solve_kwargs(),
        )
        return res, time.perf_counter() - t0

    def edit(self, lam, tasks, remove: dict):
        t0 = time.perf_counter()
        new = mf.edit(self.problem, lam, tasks, remove=remove, **self.solve_kwargs())
        return new, time.perf_counter() - t0

    def t_hvp(self, lam, tasks) -> float:
        """Median seconds of one Gauss–Newton total-Hessian product over all tasks at ``λ``."""
        pt = self.problem.point(lam, tasks)
        v = torch.randn(int(self.problem.spec.size), generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(max(1, self.a.hvp_repeat)):
            t0 = time.perf_counter()
            pt.hvp(v, self.cfg.curvature)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def noise_floor(self, train, steps: int) -> dict[str, tuple[float, float]]:
        """The full retrain once more with seed + 1 (same init and rule, another mini-batch
        order): how far two equally valid retrains land apart (``--noise-floor``)."""
        if not self.a.noise_floor:
            return {}
        return {"full_alt": self.evaluate(self.train(train, steps, seed=self.a.seed + 1)[0])}

    def evaluate(self, lam) -> tuple[float, float]:
        """(test accuracy, target loss)."""
        test = evaluate(self.problem, lam, self.test)["accuracy"]
        return test, evaluate(self.problem, lam, self.target)["loss"]


def diag_defaults() -> str:
    """The diagnostics options of the installed ``removal_effects`` left at their defaults by
    the job's call (they set what ``t_score_diag`` pays for)."""
    sig = inspect.signature(mf.removal_effects).parameters
    skip = {"items", "curvature", "solver", "solve_damping", "solver_kwargs", "lanczos_steps"}
    skip |= {"task_weight", "checkpoint_dir", "target", "diagnostics"}
    opts = [
        f"{k}={v.default}" for k, v in sig.items() if v.default is not v.empty and k not in skip
    ]
    return "; ".join(opts)


def steps_for(a: argparse.Namespace, rule: str, M: int) -> int:
    if rule == "job":
        return int(a.steps)
    return max(1, math.ceil(a.epochs * M / a.meta_batch))


def most_harmful(scores: torch.Tensor, k: int) -> list[int]:
    """Positions of the ``k`` most negative scores (math.md: negative Δf = harmful)."""
    return sorted(torch.argsort(scores.double().cpu().reshape(-1))[:k].tolist())


# --- one (rule, M) ------------------------------------------------------------------------------
NAN = float("nan")


def outcome(a, M: int, steps: int, res, scores, removed, mask, ev: dict, t: dict) -> dict:
    """One CSV row's measured fields: ``scores``/``mask`` flat over the items of the kind,
    ``removed`` flat positions, ``ev`` name → (test accuracy, target loss) for base / edit /
    full (/ warm), ``t`` the timings."""
    nan2 = (NAN, NAN)
    (acc0, f0), (acc_e, f_e), (acc_f, f_f) = ev["base"], ev["edit"], ev["full"]
    acc_w = ev.get("warm", nan2)[0]
    acc_alt = ev.get("full_alt", nan2)[0]
    return dict(
        steps=steps,
        epochs=steps * a.meta_batch / M,
        n_items=scores.numel(),
        n_flipped=int(mask.sum()),
        n_removed=len(removed),
        removed_flipped=int(mask[removed].sum()),
        acc_base=acc0,
        acc_edit=acc_e,
        acc_full=acc_f,
        acc_warm=acc_w,
        gap_edit_full=acc_e - acc_f,
        gap_warm_full=acc_w - acc_f,
        acc_full_alt=acc_alt,
        gap_full_alt=acc_alt - acc_f,
        df_pred=float(scores[removed].sum()),
        df_edit=f_e - f0,
        df_full=f_f - f0,
        **{"t_warm": NAN, "t_score_diag": NAN, **t},
        speedup=t["t_full"] / (t["t_score"] + t["t_edit"]),
        speedup_diag=t["t_full"] / (t.get("t_score_diag", NAN) + t["t_edit"]),
        cg_iters=int(torch.as_tensor(res.solve.iters).max()),
    )


def run_tasks(s: Setup, rule: str, M: int, common: dict) -> dict[str, Any]:
    a = s.a
    steps = steps_for(a, rule, M)
    tasks, mask = mf.data.flip_labels(s.tasks(M), a.noise, level="task", seed=a.seed)
    assert isinstance(mask, torch.Tensor)
    log(f"{rule} M={M} tasks: base training ({steps} steps)")
    lam, t_base, _ = s.train(tasks, steps)
    res, t_score = s.scores(lam, tasks, "task")
    t_diag = s.scores(lam, tasks, "task", diagnostics=True)[1] if M in a.diag_Ms else NAN
    scores = res.all_scores["task"].double().cpu()
    removed = most_harmful(scores, max(1, min(M - 1, int(round(a.remove * M)))))
    edited, t_edit = s.edit(lam, tasks, {"task": removed})
    keep = [t for i, t in enumerate(tasks) if i not in set(removed)]
    log(f"{rule} M={M} tasks: scores {t_score:.1f}s edit {t_edit:.1f}s; full retrain")
    full, t_full, t_step = s.train(keep, steps)
    warm, t_warm, _ = s.train(keep, a.retrain_steps, init=lam, seed=a.seed + 1)
    ev = {k: s.evaluate(p) for k, p in (("base", lam), ("edit", edited), ("full", full))}
    ev["warm"] = s.evaluate(warm)
    ev.update(s.noise_floor(keep, steps))
    t = dict(t_base=t_base, t_score=t_score, t_edit=t_edit, t_full=t_full, t_warm=t_warm)
    t.update(t_step=t_step, t_hvp=s.t_hvp(lam, tasks), t_score_diag=t_diag)
    return dict(common, kind="task", **outcome(a, M, steps, res, scores, removed, mask, ev, t))


def run_points(s: Setup, rule: str, M: int, kinds: list[str], common: dict) -> list[dict]:
    a = s.a
    steps = steps_for(a, rule, M)
    tasks, m_sup = mf.data.flip_labels(s.tasks(M), a.noise, level="point", seed=a.seed)
    tasks, m_qry = mf.data.flip_labels(
        tasks, a.noise, level="point", seed=a.seed + 1, where="query"
    )
    masks = {"support_point": m_sup, "query_point": m_qry}
    log(f"{rule} M={M} points: base training ({steps} steps)")
    lam, t_base, _ = s.train(tasks, steps)
    res, t_score = s.scores(lam, tasks, kinds[0])
    t_hvp = s.t_hvp(lam, tasks)
    base = s.evaluate(lam)
    base_batch = s.problem.batch(tasks, s.problem.flat(lam))
    rows = []
    for kind in kinds:
        sc = torch.stack(list(res.all_scores[kind])).double().cpu()  # [M, n]
        n = sc.shape[1]
        flat = most_harmful(sc, max(1, min(sc.numel() - 1, int(round(a.remove * sc.numel())))))
        pairs = [(i // n, i % n) for i in flat]
        edited, t_edit = s.edit(lam, tasks, {kind: pairs})
        log(f"{rule} M={M} {kind}: scores {t_score:.1f}s edit {t_edit:.1f}s; full retrain")
        full, t_full, t_step = s.train(base_batch.reweighted({kind: pairs}, 0.0), steps)
        ev = dict(base=base, edit=s.evaluate(edited), full=s.evaluate(full))
        ev.update(s.noise_floor(base_batch.reweighted({kind: pairs}, 0.0), steps))
        t = dict(t_base=t_base, t_score=t_score, t_edit=t_edit, t_full=t_full)
        t.update(t_step=t_step, t_hvp=t_hvp)
        mk = torch.stack(list(masks[kind])).reshape(-1)
        rows.append(
            dict(common, kind=kind, **outcome(a, M, steps, res, sc.reshape(-1), flat, mk, ev, t))
        )
    return rows


# --- outputs ------------------------------------------------------------------------------------
def read_rows(csv_path: Path) -> list[dict[str, Any]]:
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k in ("rule", "kind"):
                continue
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def series(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """``(rule, kind, rows by increasing M)`` for every rule and kind that has rows."""
    out = []
    for rule in RULES:
        for kind in KINDS:
            rs = [r for r in rows if r["rule"] == rule and r["kind"] == kind]
            if rs:
                out.append((rule, kind, sorted(rs, key=lambda r: r["M"])))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 7))
    styles = {"job": "-", "epochs": "--"}
    colors = {"task": "C0", "support_point": "C1", "query_point": "C2"}
    for rule, kind, rs in series(rows):
        Ms = [r["M"] for r in rs]
        lab = f"{kind} ({rule} rule)"
        kw = dict(ls=styles[rule], color=colors[kind], marker="o", label=lab)
        ax1.plot(Ms, [r["speedup"] for r in rs], **kw)
        ax2.plot(Ms, [r["gap_edit_full"] for r in rs], **kw)
        spread = [r["gap_full_alt"] for r in rs]
        skw = dict(color=colors[kind], marker="s", mfc="none", ls="none", alpha=0.7)
        ax2.plot(Ms, spread, **skw, label=f"full retrain seed + 1 − seed, {kind} ({rule})")
        if kind == "task":
            wc = "C3" if rule == "job" else "C4"
            wkw = dict(kw, marker="x", color=wc, label=f"warm retrain, tasks ({rule})")
            ax2.plot(Ms, [r["gap_warm_full"] for r in rs], **wkw)
    ax1.axhline(100, color="C0", lw=0.8, ls=":", label="target tasks 100×")
    ax1.axhline(1000, color="C1", lw=0.8, ls=":", label="target points 1000×")
    ax1.axhline(1, color="k", lw=0.6)
    ax1.set(xscale="log", yscale="log", xlabel="M (training tasks)")
    ax1.set(ylabel="t_full / (t_score + t_edit)", title="speed-up of the edit over full retraining")
    ax2.axhspan(-0.005, 0.005, color="0.85", label="target |gap| ≤ 0.005")
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set(xscale="log", xlabel="M (training tasks)", ylabel="test accuracy − full retrain")
    ax2.set(title="accuracy gap to full retraining")
    ms = sorted({int(r["M"]) for r in rows})
    for ax in (ax1, ax2):
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.minorticks_off()
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    """Per rule and kind: speed-up over M against its target; gaps against 0.005 and against the
    spread of retraining itself."""
    out = []
    for rule, kind, rs in series(rows):
        target = 100.0 if kind == "task" else 1000.0
        speeds = ", ".join(f"{r['speedup']:.2f}× (M={int(r['M'])})" for r in rs)
        met = sum(r["speedup"] >= target for r in rs)
        gaps = ", ".join(f"{r['gap_edit_full']:+.3f}" for r in rs)
        ok = sum(abs(r["gap_edit_full"]) <= 0.005 for r in rs)
        spread = ", ".join(f"{r['gap_full_alt']:+.3f}" for r in rs)
        out.append(
            f"- {kind}, {rule} rule: speed-up {speeds}: ≥ {target:.0f}× in {met} of {len(rs)};"
            f" gap edit − full {gaps}: |gap| ≤ 0.005 in {ok} of {len(rs)} (retraining's own"
            f" spread, seed + 1 − seed: {spread})."
        )
    return "\n".join(out)


def readme(
    rows: list[dict], info: dict, args: argparse.Namespace, running: bool, path: Path
) -> None:
    head = (
        "| rule | M | kind | steps (epochs) | acc base | edit | full | warm | full, seed + 1 |"
        " gap edit−full | t_score | t_edit | t_full | t_warm | speed-up | target met |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines: list[str] = []
    why: list[str] = []
    diag: list[str] = []
    done = path.parent / "runs.txt"
    runs = "".join(f"- {ln}" for ln in (done.read_text().splitlines(True) if done.exists() else []))
    if running:
        runs += (
            f"- {info['date']} commit {info['commit']}: in progress: python "
            f"benchmarks/fidelity_speed.py {' '.join(args.argv)}\n"
        )
    for r in rows:
        target = 100.0 if r["kind"] == "task" else 1000.0
        ok_s = r["speedup"] >= target
        ok_a = abs(r["gap_edit_full"]) <= 0.005
        warm = "—" if math.isnan(r["acc_warm"]) else f"{r['acc_warm']:.3f}"
        tw = "—" if math.isnan(r["t_warm"]) else f"{r['t_warm']:.1f}"
        alt = "—" if math.isnan(r["acc_full_alt"]) else f"{r['acc_full_alt']:.3f}"
        lines.append(
            f"| {r['rule']} | {int(r['M'])} | {r['kind']} | {int(r['steps'])} ({r['epochs']:.0f})"
            f" | {r['acc_base']:.3f} | {r['acc_edit']:.3f} | {r['acc_full']:.3f} | {warm} | {alt}"
            f" | {r['gap_edit_full']:+.3f} | {r['t_score']:.1f} | {r['t_edit']:.1f}"
            f" | {r['t_full']:.1f} | {tw} | {r['speedup']:.2f}× (≥ {target:.0f}×)"
            f" | speed {'yes' if ok_s else 'no'}, gap {'yes' if ok_a else 'no'} |"
        )
        n_hvp = 2 * int(r["cg_iters"])
        if math.isfinite(r["t_score_diag"]):
            diag.append(
                f"| {r['rule']} | {int(r['M'])} | {r['kind']} | {r['t_score']:.1f}"
                f" | {r['t_score_diag']:.1f} | {r['t_edit']:.1f} | {r['t_full']:.1f}"
                f" | {r['speedup']:.2f}× | {r['speedup_diag']:.2f}× | {r['diag_defaults']} |"
            )
        per_task_hvp = r["t_hvp"] / r["M"]
        per_task_grad = r["t_step"] / args.meta_batch
        ratio = per_task_hvp / per_task_grad
        bound = r["epochs"] / (n_hvp * ratio)
        why.append(
            f"| {r['rule']} | {int(r['M'])} | {r['kind']} | {r['t_step']:.3f} | {r['t_hvp']:.2f}"
            f" | {n_hvp} × {r['t_hvp']:.2f} = {n_hvp * r['t_hvp']:.1f}"
            f" | {r['t_score'] + r['t_edit']:.1f} | {ratio:.2f} | {r['epochs']:.0f}"
            f" | {bound:.2f}× |"
        )
    why_head = (
        "| rule | M | kind | t_step | t_hvp | products × t_hvp | t_score + t_edit | r | epochs"
        " | epochs/(n·r) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    diag_head = (
        "| rule | M | kind | t_score | t_score with diagnostics | t_edit | t_full | speed-up"
        " | speed-up with diagnostics | diagnostics defaults |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = f"""# Fidelity and speed against retraining on the `metafluence run` problem

Generated by `benchmarks/fidelity_speed.py` (issue 6); data in `fidelity_speed.csv`, plot in
`fidelity_speed.png`. Runs (start date, commit, wall time, command):

{runs}
Machine: {info["machine"]}, {info["cpus"]} CPUs, torch threads {info["threads"]}, host
`{info["host"]}` (shared: 1-min load average per row in the CSV). Python {info["python"]}, torch
{info["torch"]}, metafluence {mf.__version__}.

Problem (the job's `RunConfig` defaults): glyphs, 5-way 1-shot, 5 queries per class, Conv-4 width
{args.width} (P = {int(rows[0]["P"]) if rows else 0}), ANIL inner map (head-only, 1 step, lr 0.5),
damping 1e-3, float32, 1 thread; target = mean query loss of {args.target_tasks} val-split tasks;
test accuracy on {args.eval_tasks} test-split tasks ({args.eval_tasks * 25} query predictions:
one prediction is {1 / (args.eval_tasks * 25):.4f} of accuracy, and the binomial standard error
at accuracy 0.5 is {math.sqrt(0.25 / (args.eval_tasks * 25)):.3f}). Scores and edit: Gauss–Newton
curvature, CG maxiter {args.maxiter}, solve damping 1.0 (as the job). `t_score` times
`removal_effects(..., diagnostics=False)`: target gradient, one solve, one mixed product — what
ranking the items needs; the job's call also runs diagnostics ({args.lanczos_steps} Lanczos steps
and the library's defaults), timed separately as `t_score_diag` (see below). {args.noise:.0%}
flipped (tasks: deranged support labels; points: 20% of support and, independently, 20% of query
points flipped, one dataset and one score call for both kinds); the {args.remove:.0%} most
harmful items of the kind are removed.

Rules: `job` = {args.steps} Adam steps (lr {args.outer_lr}, mini-batches of {args.meta_batch}
tasks), whatever M; `epochs` = ceil({args.epochs:g}·M/{args.meta_batch}) steps. Stopping rule: the
step count (no gradient-norm test); the full retrain uses the same initialisation, seed and rule;
the warm retrain (tasks only) runs the job's {args.retrain_steps} steps from λ* with seed + 1.
Speed-up = t_full / (t_score + t_edit); the gap is the edit's test accuracy minus the full
retrain's. "full, seed + 1" is the same full retrain with the next seed (same initialisation,
another mini-batch order): its distance to "full" is the spread of retraining itself (where
at most {args.meta_batch} tasks remain, every step takes all of them, the seed changes nothing
and the spread is 0 by construction).
Targets (issue 6): speed-up ≥ 100× (tasks) / ≥ 1000× (points), |gap| ≤ 0.005.
Times in seconds, single measurements (t_step and t_hvp are medians).

{head}{chr(10).join(lines)}

Summary (from the rows above):

{summary(rows)}

## Where the time goes

Training costs `steps` Adam steps of `t_step` (median), each a meta-gradient over
{args.meta_batch} tasks. The influence route costs one CG solve for the scores and one more for
the edit: about n = 2·maxiter Gauss–Newton total-Hessian products over all M tasks, `t_hvp` each
(median of {args.hvp_repeat}), plus the target gradient and one mixed product per task. Per
task, one product costs `r` = (t_hvp/M)/(t_step/meta_batch) training gradients, so the
speed-up is at most about epochs / (n·r), where epochs = steps·meta_batch/M is how many times
training visits each task.

{why_head}{chr(10).join(why)}

## The job's call, with diagnostics

Where measured (`--diag-M`), the job's `removal_effects` call with diagnostics on (Lanczos
conditioning estimates and, in this library version, the options listed) on the same λ*:

{diag_head}{chr(10).join(diag)}
"""
    path.write_text(text)


def ordered(row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``row`` in ``COLUMNS`` order, with the machine-load columns."""
    out = {k: row[k] for k in COLUMNS if k in row}
    out.update(load_note(args.threads))
    return out


def finish(args: argparse.Namespace, info: dict, running: bool) -> None:
    csv_path = args.out / "fidelity_speed.csv"
    if not csv_path.exists():
        return
    rows = read_rows(csv_path)
    plot(rows, args.out / "fidelity_speed.png")
    readme(rows, info, args, running, args.out / "README.md")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    if args.plot_only:
        finish(args, info, running=False)
        return 0
    csv_path = args.out / "fidelity_speed.csv"
    runs = args.out / "runs.txt"
    if not args.append:
        csv_path.unlink(missing_ok=True)
        runs.unlink(missing_ok=True)
    t_all = time.perf_counter()
    s = Setup(args)
    for M in args.Ms:
        points = [k for k in args.kind_list if k != "task" and M in args.points_Ms]
        for rule in args.rule_list:
            common = dict(rule=rule, M=M, P=int(s.problem.spec.size))
            common.update(lanczos_steps=args.lanczos_steps, diag_defaults=diag_defaults())
            if "task" in args.kind_list:
                row = run_tasks(s, rule, M, common)
                append_csv(csv_path, [ordered(row, args)])
                log(f"  speed-up {row['speedup']:.2f}x, gap {row['gap_edit_full']:+.3f}")
            if points:
                rows = run_points(s, rule, M, points, common)
                append_csv(csv_path, [ordered(r, args) for r in rows])
                for r in rows:
                    gap = r["gap_edit_full"]
                    log(f"  {r['kind']}: speed-up {r['speedup']:.2f}x, gap {gap:+.3f}")
        finish(args, info, running=True)
    wall = time.perf_counter() - t_all
    with runs.open("a") as fh:
        fh.write(
            f"{info['date']} commit {info['commit']}, {wall / 60:.1f} min: "
            f"python benchmarks/fidelity_speed.py {' '.join(args.argv)}\n"
        )
    finish(args, info, running=False)
    log(f"done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
