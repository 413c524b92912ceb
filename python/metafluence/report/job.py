"""``metafluence run``: the main job, from data to a report.

Stages (each timed; the report lists the wall time of every one):

1. data: load the dataset (embedded glyphs by default), sample ``tasks`` meta-training tasks
   from the train split, flip the support (``flip="query"``: query) labels of ``noise`` of
   them (the injected harm), and sample target tasks (val split: the influence target) and
   evaluation tasks (test split);
2. meta-train a Conv-4 on the noisy tasks, then a stationarity phase (full-batch L-BFGS to
   ``‖∇F‖ ≤ stationary_tol``: the λ* every formula assumes);
3. influence: the job's curvature is fitted once (:func:`mf.fit_curvature`) and one call gives
   removal effects of every task, support point and query point on the target (mean
   post-adaptation query loss of the target tasks);
4. detection: rank items from most harmful (most negative removal effect); AUC and recall@k
   against the injected noise, beside the loss ranking and TracIn at ``λ*``;
5. edit: remove the ``k`` most harmful tasks without retraining (``mf.edit``: ``λ* + Δλ``);
6. retrain: meta-train without those tasks, warm-started at ``λ*``, to check the edit, and the
   control (the same extra training on all tasks); both stop by λ*'s stationarity rule;
7. report: ``report.md``, ``report.html``, PNG plots, CSV scores, ``summary.json``.

Several processes: under ``torchrun`` (or ``metafluence run --nproc N``, which launches the
workers through :mod:`metafluence.distributed.launch`) every worker runs this same job on the
same tasks; :func:`run` initialises ``torch.distributed`` from the environment (gloo on CPU, nccl
for a CUDA device, one GPU per local rank) and wraps the problem in a
:class:`~metafluence.distributed.ShardedProblem`, so meta-training, scores, the edit, retraining
and evaluation are split over the ranks while every rank holds the single-process numbers. Only
rank 0 shows progress and writes files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._store import atomic_write_bytes

INNERS = ("anil", "anil-implicit", "maml", "imaml")


@dataclass
class RunConfig:
    dataset: str = "glyphs"
    ways: int = 5
    shots: int = 1
    queries: int = 5
    tasks: int = 120
    target_tasks: int = 40
    eval_tasks: int = 40
    noise: float = 0.2
    flip: str = "support"
    inner: str = "anil"
    inner_steps: int = 1
    inner_lr: float = 0.5
    reg: float = 1.0
    model: str = "conv4"
    width: int = 32
    curvature: str = "gauss_newton"
    curvature_method: str = "secant"
    rank: int = 32
    solver: str = "cg"
    maxiter: int = 15
    pcg_iters: int = 2
    damping: float = 1e-3
    solve_damping: float = 1.0
    steps: int = 150
    stationary_tol: float | None = 0.05
    stationary_evals: int = 30
    outer_lr: float = 3e-3
    meta_batch: int | None = 32
    retrain_steps: int = 60
    remove: int | None = None
    glyph_classes: int = 300
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1
    keep_freed_memory: bool = True
    chunk_size: int | None = 64
    seed: int = 0
    out: str = "results"
    name: str | None = None
    quiet: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def run_name(self) -> str:
        if self.name:
            return self.name
        ds = self.dataset.split(":", 1)[0]
        return f"{ds}-{self.ways}way{self.shots}shot-{self.tasks}tasks-{self.inner}-seed{self.seed}"


class _Stages:
    def __init__(self, quiet: bool, total: int) -> None:
        self.times: dict[str, float] = {}
        self.quiet = quiet
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="metafluence run", unit="stage", leave=True)

    def __call__(self, name: str):
        stages = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()
                if stages.bar is not None:
                    stages.bar.set_postfix_str(name)

            def __exit__(self, *exc):
                stages.times[name] = time.perf_counter() - self.t
                if stages.bar is not None and exc[0] is None:
                    stages.bar.update(1)

        return _Ctx()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _inner(cfg: RunConfig):
    import metafluence as mf

    if cfg.inner == "anil":
        return mf.inner.HeadOnly(head="head", steps=cfg.inner_steps, lr=cfg.inner_lr)
    if cfg.inner == "anil-implicit":
        return mf.inner.HeadOnly(head="head", reg=cfg.reg, solver="direct")
    if cfg.inner == "maml":
        return mf.inner.Unrolled(steps=cfg.inner_steps, lr=cfg.inner_lr)
    if cfg.inner == "imaml":
        return mf.inner.Implicit(reg=cfg.reg, solver="cg", maxiter=50)
    raise ValueError(f"inner={cfg.inner!r}: expected one of {INNERS}")


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings about the run; deprecations of libraries are left out (they are raised once
    per process, on the first import that triggers them, so they would make the summary depend
    on what ran earlier in the process)."""
    skip = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
    return [str(w.message) for w in caught if not issubclass(w.category, skip)]


def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the job; returns the summary dict (also written to ``summary.json``).

    Inside a ``torchrun``-style worker (``RANK``/``WORLD_SIZE`` set) it initialises
    ``torch.distributed`` if needed (and tears it down again after a success if it did) and runs
    sharded; every rank returns the same summary, rank 0 writes the files.
    """
    import torch.distributed as dist

    from metafluence import distributed as mfd

    owned = not (dist.is_available() and dist.is_initialized())
    rank, world = mfd.init_from_env(_backend(cfg.device))
    owned = owned and dist.is_initialized()
    summary = _run(cfg, rank, world)
    # not on an error: the group stays up until the process exits, so the other ranks see the
    # connection go only after this rank's error is recorded (the launcher blames the first)
    if owned:
        if world > 1:
            dist.barrier()  # no rank tears gloo down while a peer may still read from it
        dist.destroy_process_group()
    return summary


@dataclass
class _Job:
    """What every stage of one run shares: its configuration, rank, device, dtype, the work
    folder (``<out>/.<name>.partial``: finished stages, then the report), the store of
    finished stages and the stage timer."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    work: Path
    store: Any
    stages: _Stages
    caught: list[str] = field(default_factory=list)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def progress(self) -> bool:
        return not (self.cfg.quiet or not self.lead)


@dataclass
class _Data:
    ds: Any
    tasks: list
    mask: torch.Tensor  # [M] bool: the tasks whose labels (``cfg.flip``) were flipped
    target: list
    held_out: list
    # tasks whose support / query labels differ from the sampled ones (what the flip changed)
    labels_changed: dict[str, int] = field(default_factory=dict)


def _run(cfg: RunConfig, rank: int, world: int) -> dict[str, Any]:
    """The stages in order (each a function over library calls); see the module docstring."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    if cfg.keep_freed_memory and device.type == "cpu":  # no page faults per pass (_malloc.py)
        from .._malloc import keep_freed_memory

        keep_freed_memory()
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set from LOCAL_RANK
    # everything is written into <out>/.<name>.partial/ (finished stages, then the report) and
    # moved into place at the end: a killed run leaves no half-written report beside an old
    # one, and a rerun with the same configuration resumes from its last finished stage
    work = Path(cfg.out) / f".{cfg.run_name()}.partial"
    job = _Job(
        cfg,
        rank,
        world,
        device,
        {"float32": torch.float32, "float64": torch.float64}[cfg.dtype],
        work,
        _stage_store(work, cfg) if world == 1 else None,
        _Stages(cfg.quiet or rank != 0, 7),
    )
    if job.lead:
        shutil.rmtree(work / "report", ignore_errors=True)
        (work / "report").mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        with job.stages("data"):
            data = _data_stage(job)
        with job.stages("meta-train"):
            problem, init, lam, train, training = _meta_train_stage(job, data)
        with job.stages("influence"), _recorded(job):
            curv, res = _influence_stage(job, problem, lam, data, training)
        with job.stages("detection"):
            detect, removed, scores = _detection_stage(job, problem, lam, data, res)
        with job.stages("edit"), _recorded(job):
            edited, _ = _stage(
                job.store, "edit", problem,
                lambda: _edit_stage(problem, lam, data.tasks, removed, curv),
            )  # fmt: skip
        curv.release()  # the point the solves shared (its gradient graph) is not needed now
        with job.stages("retrain"):
            retrained, continued = _retrain_stage(job, problem, lam, data, removed, train)
        with job.stages("report"):
            models = {"initial": init, "original": lam, "edited": edited, "retrained": retrained}
            if continued is not None:
                models["continued (all tasks)"] = continued
            summary = _summary(
                job, problem, data, res, curv, detect, removed, scores, models, training
            )
            if job.lead:
                from metafluence.report.render import write_report

                write_report(
                    work / "report",
                    summary,
                    task_scores=scores["task"],
                    task_mask=data.mask,
                    support_scores=scores["support_point"],
                    query_scores=scores["query_point"],
                    task_ids=[t.id for t in data.tasks],
                    task_classes=[t.meta.get("class_names", []) for t in data.tasks],
                    problem=problem,
                    meta_params=lam,
                    tasks=data.tasks,
                )
    finally:
        job.stages.close()
    summary["stage_seconds"] = dict(job.stages.times)
    summary["wall_seconds"] = time.perf_counter() - t_all
    out = Path(cfg.out) / cfg.run_name()
    summary["out"] = str(out)
    if job.lead:
        _finish(work / "report", summary, world)
        _publish(work / "report", out, work)
    return summary


class _recorded:  # noqa: N801 - a context manager used like a function
    """Record the warnings of a stage into ``job.caught`` (shown in the report)."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.ctx = warnings.catch_warnings(record=True)

    def __enter__(self) -> None:
        self.wlist = self.ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: Any) -> None:
        self.job.caught += _messages(self.wlist)
        self.ctx.__exit__(*exc)


def _data_stage(job: _Job) -> _Data:
    """The dataset (embedded glyphs by default), ``tasks`` meta-training tasks with the support
    (or query: ``flip``) labels of ``noise`` of them flipped, target tasks (val split) and
    held-out tasks (test)."""
    import torch.distributed as dist

    import metafluence as mf

    cfg = job.cfg
    if job.world > 1 and not job.lead:
        dist.barrier()  # rank 0 builds (and caches) the dataset first
    if cfg.dataset in ("glyphs", "glyphs:"):
        ds = mf.data.load_glyphs(num_classes=cfg.glyph_classes, seed=0, progress=job.progress)
    else:
        ds = mf.data.load(cfg.dataset)
    if job.world > 1 and job.lead:
        dist.barrier()
    kw: dict[str, Any] = dict(ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=cfg.seed)
    clean = mf.data.sample_tasks(ds, num_tasks=cfg.tasks, split="train", **kw)
    tasks, mask = mf.data.flip_labels(clean, cfg.noise, level="task", seed=cfg.seed, where=cfg.flip)
    assert isinstance(mask, torch.Tensor)  # level="task": one flag per task [M]
    tsplit = "val" if len(ds.by_class("val")) >= cfg.ways else "train"
    esplit = "test" if len(ds.by_class("test")) >= cfg.ways else tsplit
    target = mf.data.sample_tasks(
        ds, num_tasks=cfg.target_tasks, split=tsplit, first_id=10**6, **kw
    )
    held_out = mf.data.sample_tasks(
        ds, num_tasks=cfg.eval_tasks, split=esplit, first_id=2 * 10**6, **kw
    )

    def move(ts: list) -> list:
        return [t.to(job.device, job.dtype) for t in ts]

    changed = {
        where: sum(
            not torch.equal(getattr(a, where)[1], getattr(b, where)[1])
            for a, b in zip(clean, tasks, strict=True)
        )
        for where in ("support", "query")
    }
    return _Data(ds, move(tasks), mask.cpu(), move(target), move(held_out), changed)


def _meta_train_stage(job: _Job, data: _Data) -> tuple:
    """``(problem, λ_0, λ*, train, {"history", "stationarity"})``: Adam on meta-batches, then the
    stationarity phase; ``train(tasks, steps, seed, **kw)`` is the one training rule (λ*, the
    retrain and the control are all trained and stopped this way)."""
    import metafluence as mf
    from metafluence.models import build_model

    cfg = job.cfg
    c, h, _ = data.ds.image_shape
    model = build_model(cfg.model, cfg.ways, c, h, width=cfg.width, seed=cfg.seed, pool="stride")
    model = model.to(job.device, job.dtype)
    problem = mf.MetaProblem(
        model, inner=_inner(cfg), damping=cfg.damping, chunk_size=cfg.chunk_size
    )
    if job.world > 1:
        problem = mf.distributed.ShardedProblem(problem)
    history: list[float] = []
    info: dict[str, Any] = {}

    def train(train_set: list, steps: int, seed: int, **extra: Any) -> dict:
        return mf.train.meta_train(
            problem,
            model,
            train_set,
            steps=steps,
            outer_lr=cfg.outer_lr,
            seed=seed,
            optimizer="adam",
            batch_size=cfg.meta_batch,
            progress=job.progress,
            stationary_tol=cfg.stationary_tol,
            stationary_evals=cfg.stationary_evals,
            **extra,
        )

    init = problem.init_params()

    def pairs() -> dict[str, torch.Tensor]:
        got = info.get("secant_pairs")
        return {} if got is None else {"secant_S": got[0], "secant_Y": got[1]}

    lam, extra = _stage(
        job.store, "meta-train", problem,
        lambda: train(data.tasks, cfg.steps, cfg.seed, history=history, info=info),
        lambda: {"history": history, "stationarity": info.get("stationarity")},
        pairs,
    )  # fmt: skip
    kept = extra["tensors"]
    training = {
        "history": list(extra.get("history", history)),
        "stationarity": extra.get("stationarity"),
        "secant_pairs": (kept["secant_S"], kept["secant_Y"]) if "secant_S" in kept else None,
    }
    return problem, init, lam, train, training


def _job_curvature(job: _Job, problem: Any, lam: Any, data: _Data, pairs: Any) -> Any:
    """The job's one curvature. ``secant`` (default): the exact total Hessian from the secant
    pairs the stationarity phase collected on its way to λ* (free: no pass over the tasks to
    fit), the preconditioner of ``pcg_iters`` CG iterations (``solver="cg"``, default) or used
    directly (``solver="approx"``); without pairs
    (no stationarity phase) it falls back to Krylov CG on ``curvature`` (a report note says
    so). Other methods as ``mf.fit_curvature``."""
    import metafluence as mf

    cfg = job.cfg
    method, kind, solver = cfg.curvature_method, cfg.curvature, cfg.solver
    if method == "secant":
        if pairs is None:
            job.caught.append(
                "no secant pairs (the stationarity phase did not run or kept none): the job's "
                f"curvature falls back to Krylov CG on {kind!r}"
            )
            method, solver = "krylov", "cg"
        else:
            kind = "exact"  # differences of ∇F measure the exact Hessian
    elif solver == "approx" and method != "lowrank":
        solver = "cg"
    iters = cfg.pcg_iters if method == "secant" else cfg.maxiter
    options: dict[str, Any] = {"maxiter": iters} if solver in ("cg", "neumann") else {}
    if method == "secant" and solver == "cg":  # a few fixed iterations: the recurrence's ‖r‖
        options["true_residual"] = False  # is their residual (no product more per solve)
    return mf.fit_curvature(
        problem,
        lam,
        data.tasks,
        kind=kind,
        method=method,
        solver=solver,
        solve_damping=cfg.solve_damping,
        rank=cfg.rank,
        options=options,
        pairs=pairs if method == "secant" else None,
        tail_probes=0,
    )


def _influence_stage(
    job: _Job, problem: Any, lam: Any, data: _Data, training: dict[str, Any]
) -> tuple:
    """The job's one curvature (fitted once, reused by every solve) and the removal effects of
    every task, support point and query point on the target's mean query loss."""
    import metafluence as mf

    curv = _job_curvature(job, problem, lam, data, training.get("secant_pairs"))
    res = mf.removal_effects(
        problem,
        lam,
        data.tasks,
        target=data.target,
        items="task",
        curvature=curv,
        lanczos_steps=10,
        checkpoint_dir=None if job.store is None else job.work / "scores",
    )
    return curv, res


def _detection_stage(job: _Job, problem: Any, lam: Any, data: _Data, res: Any) -> tuple:
    """Detection of the flipped tasks (AUC, recall@k; harm = −removal effect) beside two
    baselines, the loss ranking and TracIn at ``λ*`` (gradient alignment ``c_k g_kᵀ∇f``, query
    points by one forward-mode pass); the ``k`` most harmful tasks to remove (``k`` =
    ``remove`` or the number flipped)."""
    import metafluence as mf

    cfg = job.cfg
    task_all = res.all_scores["task"]
    assert isinstance(task_all, torch.Tensor)
    scores = {
        "task": task_all.double().cpu(),
        "support_point": torch.stack(res.all_scores["support_point"]).double().cpu(),
        "query_point": torch.stack(res.all_scores["query_point"]).double().cpu(),
    }
    m = data.mask
    k = int(cfg.remove) if cfg.remove is not None else int(m.sum())
    k = max(1, min(k, len(data.tasks) - 1))
    # baseline: rank tasks by their own post-adaptation query loss (high = suspicious)
    loss = problem.point(lam, data.tasks).task_losses().detach().double().cpu()
    auc = mf.evaluate.detection_auc
    per_point = {
        f"{kind}_auc": auc(s.reshape(-1), m[:, None].expand_as(s).reshape(-1))
        for kind, s in scores.items()
        if kind != "task"
    }
    tracin = mf.evaluate.tracin(
        problem, lam, data.tasks, data.target, support_points=False, method="jvp"
    ).task.detach()
    detect = {
        "task_auc": auc(scores["task"], m),
        "task_auc_loss_baseline": auc(-loss, m),
        "task_auc_tracin": auc(tracin.double().cpu(), m),
        **per_point,
        "k": k,
        "recall_at_k": mf.evaluate.recall_at_k(scores["task"], m, k),
        "recall_at_2k": mf.evaluate.recall_at_k(scores["task"], m, 2 * k),
        "n_flipped": int(m.sum()),
        "n_tasks": len(data.tasks),
        "harmful_predicted": int((scores["task"] < 0).sum()),
        **_flipped_vs_clean(scores["task"], m),
    }
    removed = sorted(torch.argsort(scores["task"]).tolist()[:k])  # most harmful first
    return detect, removed, scores


def _flipped_vs_clean(task: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """What influence predicts for the flipped tasks against the clean ones: how many of the
    flipped are predicted harmful (removal effect < 0) and the mean removal effect of each
    group (``task [M]`` scores, ``mask [M]`` flipped). The report reads them to say why the
    scores rank the flipped tasks below the loss ranking, when they do."""
    flipped, clean = task[mask], task[~mask]

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else float("nan")

    return {
        "flipped_harmful_predicted": int((flipped < 0).sum()),
        "flipped_mean_effect": mean(flipped),
        "clean_mean_effect": mean(clean),
    }


def _edit_stage(problem: Any, lam: Any, tasks: list, removed: list[int], curv: Any) -> Any:
    """``λ* + Δλ`` without the ``removed`` tasks, through the job's curvature."""
    import metafluence as mf

    return mf.edit(problem, lam, tasks, remove={"task": removed}, curvature=curv)


def _retrain_stage(
    job: _Job, problem: Any, lam: Any, data: _Data, removed: list[int], train: Any
) -> tuple:
    """``retrain_steps`` more steps from λ* (seed + 1) without the removed tasks, and the
    control (the same extra steps on all tasks: separates removal from more training); both
    stopped by λ*'s stationarity rule, so edit and retrain are compared at one tolerance."""
    cfg = job.cfg
    gone = set(removed)
    keep = [t for i, t in enumerate(data.tasks) if i not in gone]

    def warm(train_set: list) -> dict:
        return train(train_set, cfg.retrain_steps, cfg.seed + 1, init=lam)

    retrained, _ = _stage(job.store, "retrain", problem, lambda: warm(keep))
    continued = None
    if cfg.extra.get("control", True):
        continued, _ = _stage(job.store, "control", problem, lambda: warm(data.tasks))
    return retrained, continued


def _summary(
    job: _Job,
    problem: Any,
    data: _Data,
    res: Any,
    curv: Any,
    detect: dict,
    removed: list[int],
    scores: dict,
    models: dict,
    training: dict,
) -> dict[str, Any]:
    """Everything the report shows: evaluations of every model on the target and held-out
    tasks, the target change (predicted, edited, retrained, continued), the solve, the
    curvature, stationarity, diagnostics and the run's warnings."""
    import metafluence as mf

    perf = mf.evaluate.adapted_performance
    evals = {
        name: {"target": perf(problem, p, data.target), "test": perf(problem, p, data.held_out)}
        for name, p in models.items()
    }
    f0 = evals["original"]["target"]["loss"]
    change = {"predicted": float(scores["task"][removed].sum())}
    for key, name in (
        ("edited", "edited"),
        ("retrained", "retrained"),
        ("continued", "continued (all tasks)"),
    ):
        if name in evals:
            change[key] = evals[name]["target"]["loss"] - f0
    diag = {
        k: v for k, v in res.diagnostics.items() if isinstance(v, (int, float, str, bool, list))
    }
    return {
        "config": asdict(job.cfg),
        "dataset": data.ds.summary(),
        "dataset_source": data.ds.meta.get("source", data.ds.meta.get("path")),
        "parameters": int(problem.spec.size),
        "detection": detect,
        "removed_tasks": [data.tasks[i].id for i in removed],
        "removed_flipped": int(data.mask[removed].sum()),
        "labels_changed": data.labels_changed,
        "evaluation": evals,
        "target_change": change,
        "solve": {
            "purpose": "total solve for the target (s-test)",
            **dict(res.diagnostics.get("solve", {})),
        },
        "curvature": {**curv.config(), "fit": curv.fit_info},
        "stationarity": training["stationarity"],
        "meta_grad_norm": res.meta_grad_norm,
        "diagnostics": diag,
        "warnings": sorted(set(job.caught)),
        "train_history": training["history"],
        "secant_pairs": None
        if training.get("secant_pairs") is None
        else int(training["secant_pairs"][0].shape[0]),
        "stage_seconds": dict(job.stages.times),
        "processes": problem.reduce.world,  # ranks sharing the tasks
    }


def _finish(staging: Path, summary: dict[str, Any], world: int) -> None:
    """Append the total wall time to ``report.md`` and write ``summary.json`` last, atomically
    (its presence means every other file is complete), with the other files' permissions."""
    procs = f"{world} processes, " if world > 1 else ""
    with open(staging / "report.md", "a") as fh:
        fh.write(
            f"\nTotal wall time: {summary['wall_seconds']:.1f} s ({procs}{os.cpu_count()} CPU "
            f"cores visible, torch threads {torch.get_num_threads()}).\n"
        )
    data = json.dumps(summary, indent=2, default=str).encode()
    atomic_write_bytes(staging / "summary.json", data)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging / "summary.json", 0o666 & ~mask)  # like the other files (not the temp's 0600)


def _stage_store(work: Path, cfg: RunConfig) -> Any:
    """The store of finished stages, bound to everything that determines their results (a
    store written with another configuration is cleared, not mixed in)."""
    from .._store import ProgressStore
    from .._version import __version__

    unbound = ("quiet", "out", "name", "keep_freed_memory")  # they do not change results
    keep = {k: v for k, v in asdict(cfg).items() if k not in unbound}
    config = {"stage": "metafluence-run", "config": keep, "version": __version__}
    return ProgressStore(work / "stages", config, overwrite=True)


def _stage(
    store: Any,
    key: str,
    problem: Any,
    compute: Any,
    meta: Any = None,
    tensors: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(meta_params, meta)`` of a finished stage from ``store``, else ``compute()`` (then
    stored, with ``meta()`` and the tensors ``tensors()``; those come back in
    ``meta["tensors"]``). Bit-identical on resume: the parameters are stored exactly."""
    got = store.get(key) if store is not None else None
    if got is not None and "lam" in got[0]:
        extra = dict(got[1])
        extra["tensors"] = {k: v for k, v in got[0].items() if k != "lam"}
        return problem.unflat(got[0]["lam"]), extra
    params = compute()
    extra = dict(meta()) if meta is not None else {}
    more = dict(tensors()) if tensors is not None else {}
    if store is not None:
        store.save(key, {"lam": problem.flat(params).detach(), **more}, extra)
    extra["tensors"] = more
    return params, extra


def _publish(staging: Path, out: Path, work: Path) -> None:
    """Move the finished report into ``out`` (an older run's files there are replaced, never
    mixed with the new ones) and drop the work folder."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
