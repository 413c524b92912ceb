"""Meta-training: simple, seeded, deterministic on CPU, with a fixed stopping rule.

``meta_train`` minimises ``F(λ) = Σ_i c_i L_O(θ_i(λ); Q_i) + (δ/2)‖λ‖²`` from the model's current
parameters (the shared initialisation, so that retraining is honest) with one of

- ``"adam"`` / ``"sgd"``: ``steps`` updates on the full task set, or on seeded mini-batches of
  ``batch_size`` tasks (then ``c_i = 1/batch_size`` inside a batch);
- ``"lbfgs"``: full batch, strong-Wolfe line search (float64 recommended);
- ``"newton"``: full batch, dense exact total Hessian (small ``P`` only).

Stopping rule: after ``steps`` iterations, or as soon as ``‖∇F‖ ≤ tol`` (full batch only).

Resuming: ``on_step(done, snapshot)`` is called after every step; ``snapshot()`` returns a
:class:`TrainState` (λ, the optimizer's full state — Adam moments and step count, SGD momentum,
L-BFGS history — and the mini-batch generator's state). ``meta_train(..., state=that)``
continues from it and is bit-identical to the uninterrupted run (CPU);
:func:`metafluence.train.checkpoint.meta_train_resumable` stores the snapshots atomically.
``newton_refine`` polishes a stationary point to ``‖∇F‖ ≤ 1e-12`` (ground-truth retraining).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .._checks import check_float, check_int
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..data.source import TaskSource
from ..data.tasks import TaskBatch
from ._bar import progress_bar
from .refine import newton_refine
from .stationary import make_stationary

OPTIMIZERS = ("adam", "sgd", "lbfgs", "newton")


@dataclass
class TrainState:
    """Everything needed to continue :func:`meta_train` exactly where it stopped.

    ``step``: optimizer steps done; ``lam`` ``[P]``; ``f``: ``F`` reported at the last step;
    ``tensors`` / ``meta``: the optimizer state and the generator state, already split into a
    tensor dict and a JSON-able dict (the form :func:`metafluence._store.save_tensors` takes).
    """

    step: int
    lam: Tensor
    optimizer: str
    f: float = float("nan")
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _pack_state(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One parameter's optimizer state → ``(tensors, meta)`` (tensors, lists of tensors/None,
    numbers). Floats survive JSON exactly (``repr`` round-trips)."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Tensor):
            tensors[f"opt.{k}"] = v.detach().clone()
        elif isinstance(v, (list, tuple)):
            kinds: list[Any] = []
            for i, e in enumerate(v):
                if isinstance(e, Tensor):
                    tensors[f"opt.{k}.{i}"] = e.detach().clone()
                    kinds.append("T")
                elif e is None or isinstance(e, (bool, int, float)):
                    kinds.append(["V", e])
                else:
                    raise TypeError(f"optimizer state {k!r}[{i}]: cannot store {type(e).__name__}")
            meta[k] = {"list": kinds}
        elif v is None or isinstance(v, (bool, int, float)):
            meta[k] = {"value": v}
        else:
            raise TypeError(f"optimizer state {k!r}: cannot store {type(v).__name__}")
    return tensors, meta


def _unpack_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_pack_state`."""
    out: dict[str, Any] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "opt" and len(parts) == 2:
            out[parts[1]] = t
    for k, m in meta.items():
        if "value" in m:
            out[k] = m["value"]
        else:
            out[k] = [
                tensors[f"opt.{k}.{i}"] if e == "T" else e[1] for i, e in enumerate(m["list"])
            ]
    return out


def _snapshot(
    step: int, x: Tensor, optimizer: str, opt: torch.optim.Optimizer, gen: torch.Generator, f: float
) -> TrainState:
    st = opt.state_dict()["state"]
    tensors, meta = _pack_state(st.get(0, {}))
    tensors["generator"] = gen.get_state()
    return TrainState(int(step), x.detach().clone(), optimizer, float(f), tensors, {"opt": meta})


def _restore(
    state: TrainState, optimizer: str, opt: torch.optim.Optimizer, gen: torch.Generator
) -> None:
    if state.optimizer != optimizer:
        raise ValueError(
            f"state was saved by optimizer={state.optimizer!r}, not optimizer={optimizer!r}"
        )
    if "generator" in state.tensors:
        gen.set_state(state.tensors["generator"].clone())
    opt_tensors = {k: v for k, v in state.tensors.items() if k.startswith("opt.")}
    packed = _unpack_state(opt_tensors, state.meta.get("opt", {}))
    if packed:
        sd = opt.state_dict()
        sd["state"] = {0: packed}
        opt.load_state_dict(sd)


def meta_train(
    problem: MetaProblem,
    model: torch.nn.Module | None,
    tasks: TasksLike,
    steps: int = 100,
    outer_lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
    batch_size: int | None = None,
    tol: float = 0.0,
    init: ParamsLike | None = None,
    task_weight: Tensor | None = None,
    progress: bool = False,
    callback: Callable[[int, Tensor, float], None] | None = None,
    history: list[float] | None = None,
    state: TrainState | None = None,
    on_step: Callable[[int, Callable[[], TrainState]], None] | None = None,
    stationary_tol: float | None = None,
    stationary_evals: int = 200,
    info: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Train meta-parameters; returns them as a dict (model parameter order).

    Args:
        problem: the :class:`MetaProblem`.
        model: supplies the initial parameters (defaults to ``problem.model``); ``init`` overrides.
        tasks: meta-training tasks (list of Task or a TaskBatch whose weights are respected).
        steps: iterations (optimizer steps; L-BFGS: outer iterations; Newton: steps).
        outer_lr: step size (Adam/SGD) or L-BFGS ``lr``.
        seed: seeds the mini-batch order (the run is deterministic on CPU).
        optimizer: ``"adam" | "sgd" | "lbfgs" | "newton"``.
        batch_size: tasks per step for Adam/SGD (None = all).
        tol: stop when ``‖∇F‖ ≤ tol`` (full batch).
        history: if given, ``F`` after each step is appended to it.
        callback: ``callback(it, λ [P], F)`` after step ``it`` (0-based, counted from the start
            of the run even when resuming).
        state: a :class:`TrainState` to continue from (overrides ``init``/``model``); the
            remaining ``steps - state.step`` steps run, bit-identical to an uninterrupted run.
        on_step: ``on_step(done, snapshot)`` after each step (``done`` steps finished);
            ``snapshot()`` builds the :class:`TrainState` (call it only when saving: it copies
            the optimizer state). Not called for ``"newton"``.
        stationary_tol: after the ``steps``, a stationarity phase on the full task set
            (:func:`metafluence.train.stationary.make_stationary`: full-batch L-BFGS until
            ``‖∇F‖ ≤ stationary_tol``, at most ``stationary_evals`` gradient evaluations).
            ``None`` (default): no such phase.
        info: if given, ``info["stationarity"]`` receives the phase's
            :class:`~metafluence.train.stationary.StationarityReport` as a dict and
            ``info["secant_pairs"]`` its secant pairs ``(S, Y)`` (or None), the raw material
            of ``mf.fit_curvature(..., method="secant", pairs=...)``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    steps = check_int(steps, "steps", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    tol = check_float(tol, "tol", minimum=0.0)
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
    check_float(outer_lr, "outer_lr", positive=True)
    if state is not None:
        lam0 = problem.flat(state.lam)
    elif init is not None:
        lam0 = problem.flat(init)
    else:
        src = problem.model if model is None else model
        lam0 = problem.spec.flatten({n: p.detach() for n, p in src.named_parameters()})
    lam = lam0.clone()
    full = problem.batch(tasks, lam, task_weight)
    gen = torch.Generator().manual_seed(int(seed))
    start = 0 if state is None else int(state.step)
    bar = progress_bar(int(steps), progress, f"meta-train ({optimizer})")
    if bar is not None and start:
        bar.update(min(start, int(steps)))

    def value_and_grad(x: Tensor, batch: TaskBatch | TaskSource) -> tuple[Tensor, Tensor]:
        f, g = problem.point(x, batch).value_and_grad()
        return f.detach(), g.detach()

    if optimizer == "newton":
        left = max(int(steps) - start, 0)
        lam = problem.flat(newton_refine(problem, lam, full, tol=tol, max_steps=left, warn=tol > 0))
    elif optimizer == "lbfgs":
        x = lam.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [x],
            lr=outer_lr,
            max_iter=20,
            history_size=50,
            line_search_fn="strong_wolfe",
            tolerance_grad=max(tol, 1e-300),
            tolerance_change=0.0,
        )

        def closure() -> Tensor:
            f, g = value_and_grad(x.detach(), full)
            x.grad = g
            return f

        if state is not None:
            _restore(state, optimizer, opt, gen)
        for it in range(start, int(steps)):
            opt.step(closure)
            f, g = value_and_grad(x.detach(), full)
            if history is not None:
                history.append(float(f))
            if callback is not None:
                callback(it, x.detach(), float(f))
            if on_step is not None:
                on_step(it + 1, partial(_snapshot, it + 1, x, optimizer, opt, gen, float(f)))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(F=float(f), grad=float(g.norm()))
            if float(g.norm()) <= tol:
                break
        lam = x.detach()
    else:
        x = lam.clone().requires_grad_(True)
        opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        sgd_opt = opt_cls([x], lr=outer_lr)
        M = full.num_tasks
        if state is not None:
            _restore(state, optimizer, sgd_opt, gen)
        for it in range(start, int(steps)):
            if batch_size is None or batch_size >= M:
                batch = full
            else:
                idx = torch.randperm(M, generator=gen)[: int(batch_size)].tolist()
                sub = full.select(idx)
                batch = sub.with_weights(
                    task_weight=torch.full_like(sub.task_weight, 1.0 / len(idx))
                )
            f, g = value_and_grad(x.detach(), batch)
            if history is not None:
                history.append(float(f))
            if batch is full and float(g.norm()) <= tol:
                break
            sgd_opt.zero_grad(set_to_none=True)
            x.grad = g
            sgd_opt.step()
            if callback is not None:
                callback(it, x.detach(), float(f))
            if on_step is not None:
                on_step(it + 1, partial(_snapshot, it + 1, x, optimizer, sgd_opt, gen, float(f)))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(F=float(f))
        lam = x.detach()
    if bar is not None:
        bar.close()
    if stationary_tol is not None:
        out, report = make_stationary(
            problem, lam, full, stationary_tol, max_evals=stationary_evals, progress=progress
        )
        if info is not None:
            info["stationarity"] = report.as_dict()
            info["secant_pairs"] = report.pairs  # (S, Y) or None: mf.fit_curvature(method="secant")
        return out
    return problem.unflat(lam)


def grad_norm(problem: MetaProblem, meta_params: ParamsLike, tasks: TasksLike) -> float:
    """``‖∇F(λ)‖``."""
    return float(problem.meta_grad(meta_params, tasks).norm())
