"""``metafluence run``: the main job, from data to a report.

Stages (each timed; the report lists the wall time of every one):

1. data: load the dataset (embedded glyphs by default), sample ``tasks`` meta-training tasks
   from the train split, flip the support labels of ``noise`` of them (the injected harm),
   and sample target tasks (val split: the influence target) and evaluation tasks (test split);
2. meta-train a Conv-4 on the noisy tasks, then a stationarity phase (full-batch L-BFGS to
   ``‖∇F‖ ≤ stationary_tol``: the λ* every formula assumes);
3. influence: the job's curvature is fitted once (:func:`mf.fit_curvature`) and one call gives
   removal effects of every task, support point and query point on the target (mean
   post-adaptation query loss of the target tasks);
4. detection: rank items from most harmful (most negative removal effect); AUC and recall@k
   against the injected noise;
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

from .._progress import atomic_write_bytes

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
    inner: str = "anil"
    inner_steps: int = 1
    inner_lr: float = 0.5
    reg: float = 1.0
    model: str = "conv4"
    width: int = 32
    curvature: str = "gauss_newton"
    curvature_method: str = "krylov"
    rank: int = 32
    solver: str = "cg"
    maxiter: int = 15
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


def evaluate(problem, meta_params, tasks) -> dict[str, float]:
    """Mean post-adaptation query loss and accuracy over ``tasks``.

    The adaptation runs on the problem's point (sharded over ranks for a ``ShardedProblem``;
    ``task_losses`` and ``adapted`` come back gathered, ``[M]`` and ``[M, P]``); the query
    logits are then taken on every rank for all ``M`` tasks (a cheap forward pass).
    """
    pt = problem.point(meta_params, tasks)
    with torch.no_grad():
        losses = pt.task_losses()
        thetas = pt.adapted()
        b = problem.batch(tasks, pt.lam)
        correct = 0
        total = 0
        for i in range(b.num_tasks):
            logits = problem.fm.logits(thetas[i], b.xq[i])
            correct += int((logits.argmax(-1) == b.yq[i]).sum())
            total += int(b.yq[i].numel())
    return {"loss": float(losses.mean()), "accuracy": correct / max(1, total)}


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


def _run(cfg: RunConfig, rank: int, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    import metafluence as mf
    from metafluence.models import build_model
    from metafluence.report import metrics as M
    from metafluence.report.render import write_report

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
    device = torch.device(cfg.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set from LOCAL_RANK
    lead = rank == 0
    out = Path(cfg.out) / cfg.run_name()
    # everything is written into <out>/.<name>.partial/ (finished stages, then the report) and
    # moved into place at the end: a killed run leaves no half-written report beside an old
    # one, and a rerun with the same configuration resumes from its last finished stage
    work = Path(cfg.out) / f".{cfg.run_name()}.partial"
    staging = work / "report"
    store = _stage_store(work, cfg) if world == 1 else None
    if lead:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    quiet = cfg.quiet or not lead
    stages = _Stages(quiet, 7)
    progress = not quiet
    t_all = time.perf_counter()
    caught: list[str] = []
    try:
        with stages("data"):
            if world > 1 and not lead:
                dist.barrier()  # rank 0 builds (and caches) the dataset first
            if cfg.dataset in ("glyphs", "glyphs:"):
                ds = mf.data.load_glyphs(num_classes=cfg.glyph_classes, seed=0, progress=progress)
            else:
                ds = mf.data.load(cfg.dataset)
            if world > 1 and lead:
                dist.barrier()
            kw: dict[str, Any] = dict(
                ways=cfg.ways, shots=cfg.shots, queries=cfg.queries, seed=cfg.seed
            )
            clean = mf.data.sample_tasks(ds, num_tasks=cfg.tasks, split="train", **kw)
            tasks, mask = mf.data.flip_labels(clean, cfg.noise, level="task", seed=cfg.seed)
            tsplit = "val" if len(ds.by_class("val")) >= cfg.ways else "train"
            esplit = "test" if len(ds.by_class("test")) >= cfg.ways else tsplit
            target = mf.data.sample_tasks(
                ds, num_tasks=cfg.target_tasks, split=tsplit, first_id=10**6, **kw
            )
            held_out = mf.data.sample_tasks(
                ds, num_tasks=cfg.eval_tasks, split=esplit, first_id=2 * 10**6, **kw
            )
            move = lambda ts: [  # noqa: E731
                mf.Task(
                    (t.support[0].to(device, dtype), t.support[1].to(device)),
                    (t.query[0].to(device, dtype), t.query[1].to(device)),
                    id=t.id,
                    meta=t.meta,
                )
                for t in ts
            ]
            tasks, target, held_out = move(tasks), move(target), move(held_out)
        with stages("meta-train"):
            c, h, _ = ds.image_shape
            model = build_model(
                cfg.model, cfg.ways, c, h, width=cfg.width, seed=cfg.seed, pool="stride"
            ).to(device, dtype)
            problem = mf.MetaProblem(
                model, inner=_inner(cfg), damping=cfg.damping, chunk_size=cfg.chunk_size
            )
            if world > 1:
                problem = mf.distributed.ShardedProblem(problem)
            init = problem.init_params()
            history: list[float] = []
            train_info: dict[str, Any] = {}

            def train(train_set: list, steps: int, seed: int, **extra: Any) -> dict:
                """Adam on meta-batches, then the stationarity rule: λ*, the retrain and the
                control are all trained (and stopped) this one way."""
                return mf.train.meta_train(
                    problem,
                    model,
                    train_set,
                    steps=steps,
                    outer_lr=cfg.outer_lr,
                    seed=seed,
                    optimizer="adam",
                    batch_size=cfg.meta_batch,
                    progress=progress,
                    stationary_tol=cfg.stationary_tol,
                    stationary_evals=cfg.stationary_evals,
                    **extra,
                )

            def first_training() -> dict[str, torch.Tensor]:
                return train(tasks, cfg.steps, cfg.seed, history=history, info=train_info)

            lam, extra = _stage(
                store, "meta-train", problem, first_training,
                lambda: {"history": history, "stationarity": train_info.get("stationarity")},
            )  # fmt: skip
            history = list(extra.get("history", history))
            train_info["stationarity"] = extra.get("stationarity")
        with stages("influence"), warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            # one curvature for the job: every solve (scores, edit) reuses it
            curv = mf.fit_curvature(
                problem,
                lam,
                tasks,
                kind=cfg.curvature,
                method=cfg.curvature_method,
                solver=cfg.solver,
                solve_damping=cfg.solve_damping,
                rank=cfg.rank,
                options={"maxiter": cfg.maxiter} if cfg.solver in ("cg", "neumann") else {},
            )
            res = mf.removal_effects(
                problem,
                lam,
                tasks,
                target=target,
                items="task",
                curvature=curv,
                lanczos_steps=10,
                checkpoint_dir=None if store is None else work / "scores",
            )
            caught += _messages(wlist)
        with stages("detection"):
            task_all = res.all_scores["task"]
            assert isinstance(task_all, torch.Tensor)
            task_scores = task_all.double().cpu()
            sup = torch.stack(res.all_scores["support_point"]).double().cpu()
            qry = torch.stack(res.all_scores["query_point"]).double().cpu()
            n_sup, n_qry = sup.shape[1], qry.shape[1]
            assert isinstance(mask, torch.Tensor)  # level="task": one flag per task [M]
            m = mask.cpu()
            sup_mask = m[:, None].expand(-1, n_sup)
            qry_mask = m[:, None].expand(-1, n_qry)
            k = int(cfg.remove) if cfg.remove is not None else int(m.sum())
            k = max(1, min(k, len(tasks) - 1))
            # baseline: rank tasks by their own post-adaptation query loss (high = suspicious)
            task_loss = problem.point(lam, tasks).task_losses().detach().double().cpu()
            detect = {
                "task_auc": M.roc_auc(-task_scores, m),
                "task_auc_loss_baseline": M.roc_auc(task_loss, m),
                "support_point_auc": M.roc_auc(-sup.reshape(-1), sup_mask.reshape(-1)),
                "query_point_auc": M.roc_auc(-qry.reshape(-1), qry_mask.reshape(-1)),
                "k": k,
                "recall_at_k": M.recall_at_k(-task_scores, m, k),
                "recall_at_2k": M.recall_at_k(-task_scores, m, 2 * k),
                "n_flipped": int(m.sum()),
                "n_tasks": len(tasks),
                "harmful_predicted": int((task_scores < 0).sum()),
            }
            order = torch.argsort(task_scores).tolist()  # most harmful first
            removed = sorted(order[:k])
        with stages("edit"), warnings.catch_warnings(record=True) as wlist:
            warnings.simplefilter("always")
            edited, _ = _stage(
                store, "edit", problem,
                lambda: mf.edit(problem, lam, tasks, remove={"task": removed}, curvature=curv),
            )  # fmt: skip
            caught += _messages(wlist)
        with stages("retrain"):
            keep = [t for i, t in enumerate(tasks) if i not in set(removed)]

            def warm_retrain(train_set: list) -> dict:
                """``retrain_steps`` more steps from λ* (seed + 1) on ``train_set``, stopped by
                λ*'s stationarity rule (edit and retrain compared at one tolerance)."""
                return train(train_set, cfg.retrain_steps, cfg.seed + 1, init=lam)

            retrained, _ = _stage(store, "retrain", problem, lambda: warm_retrain(keep))
            # control: the same extra steps on all tasks (separates removal from more training)
            continued = None
            if cfg.extra.get("control", True):
                continued, _ = _stage(store, "control", problem, lambda: warm_retrain(tasks))
        with stages("report"):
            models = {"initial": init, "original": lam, "edited": edited, "retrained": retrained}
            if continued is not None:
                models["continued (all tasks)"] = continued
            evals = {
                name: {
                    "target": evaluate(problem, p, target),
                    "test": evaluate(problem, p, held_out),
                }
                for name, p in models.items()
            }
            f0 = evals["original"]["target"]["loss"]
            change = {
                "predicted": float(task_scores[removed].sum()),
                "edited": evals["edited"]["target"]["loss"] - f0,
                "retrained": evals["retrained"]["target"]["loss"] - f0,
            }
            if continued is not None:
                change["continued"] = evals["continued (all tasks)"]["target"]["loss"] - f0
            diag = {
                k2: v
                for k2, v in res.diagnostics.items()
                if isinstance(v, (int, float, str, bool, list))
            }
            diag_solve = dict(res.diagnostics.get("solve", {}))
            summary: dict[str, Any] = {
                "config": asdict(cfg),
                "dataset": ds.summary(),
                "dataset_source": ds.meta.get("source", ds.meta.get("path")),
                "parameters": int(problem.spec.size),
                "detection": detect,
                "removed_tasks": [tasks[i].id for i in removed],
                "removed_flipped": int(m[removed].sum()),
                "evaluation": evals,
                "target_change": change,
                "solve": {"purpose": "total solve for the target (s-test)", **diag_solve},
                "curvature": {**curv.config(), "fit": curv.fit_info},
                "stationarity": train_info.get("stationarity"),
                "meta_grad_norm": res.meta_grad_norm,
                "diagnostics": diag,
                "warnings": sorted(set(caught)),
                "train_history": history,
            }
            summary["stage_seconds"] = dict(stages.times)
            summary["processes"] = getattr(problem, "world", 1)  # ranks sharing the tasks
            if lead:
                write_report(
                    staging,
                    summary,
                    task_scores=task_scores,
                    task_mask=m,
                    support_scores=sup,
                    query_scores=qry,
                    task_ids=[t.id for t in tasks],
                    task_classes=[t.meta.get("class_names", []) for t in tasks],
                    problem=problem,
                    meta_params=lam,
                    tasks=tasks,
                )
    finally:
        stages.close()
    summary["stage_seconds"] = dict(stages.times)
    summary["wall_seconds"] = time.perf_counter() - t_all
    summary["out"] = str(out)
    if not lead:
        return summary
    # the report files carry the stage times known when they were written; add the total
    procs = f"{world} processes, " if world > 1 else ""
    with open(staging / "report.md", "a") as fh:
        fh.write(
            f"\nTotal wall time: {summary['wall_seconds']:.1f} s ({procs}{os.cpu_count()} CPU "
            f"cores visible, torch threads {torch.get_num_threads()}).\n"
        )
    # written last and atomically: its presence means every other file is complete
    data = json.dumps(summary, indent=2, default=str).encode()
    atomic_write_bytes(staging / "summary.json", data)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging / "summary.json", 0o666 & ~mask)  # like the other files (not the temp's 0600)
    _publish(staging, out, work)
    return summary


def _stage_store(work: Path, cfg: RunConfig) -> Any:
    """The store of finished stages, bound to everything that determines their results (a
    store written with another configuration is cleared, not mixed in)."""
    from .._progress import ProgressStore
    from .._version import __version__

    keep = {k: v for k, v in asdict(cfg).items() if k not in ("quiet", "out", "name")}
    config = {"stage": "metafluence-run", "config": keep, "version": __version__}
    return ProgressStore(work / "stages", config, overwrite=True)


def _stage(
    store: Any,
    key: str,
    problem: Any,
    compute: Any,
    meta: Any = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(meta_params, meta)`` of a finished stage from ``store``, else ``compute()`` (then
    stored, with ``meta()``). Bit-identical on resume: the parameters are stored exactly."""
    got = store.get(key) if store is not None else None
    if got is not None and "lam" in got[0]:
        return problem.unflat(got[0]["lam"]), dict(got[1])
    params = compute()
    extra = dict(meta()) if meta is not None else {}
    if store is not None:
        store.save(key, {"lam": problem.flat(params).detach()}, extra)
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
