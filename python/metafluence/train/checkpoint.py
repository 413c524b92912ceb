"""Checkpoints of meta-parameters and resumable meta-training.

Files are safetensors when the path ends in ``.safetensors`` (readable by any safetensors tool),
else ``torch.save`` payloads loaded with ``weights_only=True``: no code runs on load. Every file
carries a SHA-256 checksum of its content (:mod:`metafluence._store`); a truncated or
corrupted checkpoint raises :class:`~metafluence._store.CheckpointCorruptError` and is never
used. Writes are atomic and durable (temp file, ``fsync``, ``os.replace``, ``fsync`` of the
directory), so a killed run leaves the previous checkpoint or the new one, never a torn file.

A checkpoint of :func:`meta_train_resumable` also holds the optimizer state (Adam moments and
step count, SGD momentum, L-BFGS history) and the mini-batch generator state, under the reserved
tensor prefix ``__mf_state__/``; :func:`load_checkpoint` returns only the meta-parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._store import (
    CheckpointCorruptError,
    config_diff,
    digest,
    load_tensors,
    remove_stray_temps,
    save_tensors,
)
from ..bilevel.problem import MetaProblem, TasksLike
from ..data.source import TaskSource
from ..data.tasks import Task, TaskBatch
from .meta_train import TrainState, meta_train

__all__ = [
    "CheckpointCorruptError",
    "default_checkpoint_path",
    "load_checkpoint",
    "load_train_state",
    "meta_train_resumable",
    "save_checkpoint",
]

_STATE = "__mf_state__/"
_INTERNAL = "__mf_"


def _has_safetensors() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def save_checkpoint(
    path: str | os.PathLike,
    meta_params: Mapping[str, Tensor],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write ``meta_params`` (+ a JSON-able ``meta`` dict, e.g. the step) with a
    checksum."""
    return save_tensors(path, meta_params, meta)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(meta_params, meta)`` from :func:`save_checkpoint` or :func:`meta_train_resumable`.

    Verified against its checksum (raises ``CheckpointCorruptError``); no pickled code runs.
    """
    tensors, meta = load_tensors(path)
    params = {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
    return params, {k: v for k, v in meta.items() if not k.startswith(_INTERNAL)}


def load_train_state(problem: MetaProblem, path: str | os.PathLike) -> TrainState | None:
    """The :class:`TrainState` stored by :func:`meta_train_resumable` (None if it holds none)."""
    return _state_from(problem, *load_tensors(path))


def _state_from(
    problem: MetaProblem, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> TrainState | None:
    info = meta.get(_INTERNAL + "state")
    if info is None:
        return None
    params = {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
    return TrainState(
        step=int(meta["step"]),
        lam=problem.flat(params).clone(),
        optimizer=str(info["optimizer"]),
        f=float(meta.get("F", float("nan"))),
        tensors={k[len(_STATE) :]: v for k, v in tensors.items() if k.startswith(_STATE)},
        meta=dict(info["meta"]),
    )


def _save_state(path: Path, problem: MetaProblem, st: TrainState, config: dict[str, Any]) -> None:
    tensors = dict(problem.unflat(st.lam))
    tensors.update({_STATE + k: v for k, v in st.tensors.items()})
    meta = {
        "step": st.step,
        "F": st.f,
        _INTERNAL + "state": {"optimizer": st.optimizer, "meta": st.meta},
        _INTERNAL + "config": config,
    }
    save_tensors(path, tensors, meta)


def default_checkpoint_path(directory: str | os.PathLike, name: str = "meta_params") -> Path:
    suffix = ".safetensors" if _has_safetensors() else ".pt"
    return Path(directory) / f"{name}{suffix}"


def _run_config(
    problem: MetaProblem, model: torch.nn.Module | None, tasks: TasksLike, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """What determines the trajectory (``steps``/``every`` excluded: a run may be extended)."""
    init = kwargs.get("init")
    if init is None:
        src = problem.model if model is None else model
        init = problem.spec.flatten({n: p.detach() for n, p in src.named_parameters()})
    data = tasks if isinstance(tasks, (list, tuple, Task, TaskBatch)) else None  # not iterators
    tw = kwargs.get("task_weight")
    ids = getattr(tasks, "ids", None) if isinstance(tasks, TaskSource) else None
    return {
        "problem": repr(problem),  # model type, loss, inner map, damping, P
        "task_ids": None if ids is None else digest([repr(i) for i in ids]),
        "optimizer": str(kwargs.get("optimizer", "adam")),
        "outer_lr": float(kwargs.get("outer_lr", 1e-3)),
        "seed": int(kwargs.get("seed", 0)),
        "batch_size": None if kwargs.get("batch_size") is None else int(kwargs["batch_size"]),
        "tol": float(kwargs.get("tol", 0.0)),
        "init": digest(problem.flat(init)),
        "tasks": None if data is None else digest(data, strict=False),
        "task_weight": None if tw is None else digest(tw),
    }


def meta_train_resumable(
    problem: MetaProblem,
    model: torch.nn.Module | None,
    tasks: TasksLike,
    checkpoint: str | os.PathLike,
    steps: int = 100,
    every: int = 25,
    **kwargs: Any,
) -> dict[str, Tensor]:
    """:func:`meta_train` that saves every ``every`` steps and resumes from ``checkpoint``.

    Each checkpoint holds λ, the optimizer state and the mini-batch generator state, so a run
    killed at any point (even SIGKILL mid-write) and rerun with the same arguments continues
    from the last checkpoint and returns exactly (bit for bit, on CPU) what an uninterrupted
    run returns; only the steps after the last checkpoint are recomputed. ``steps`` may be
    raised between runs to extend training. A checkpoint written with different
    hyperparameters, initialisation or tasks raises ``ValueError`` naming the differing keys;
    a damaged one raises :class:`CheckpointCorruptError`. A finished checkpoint
    (``step >= steps``) is returned as is. ``"newton"`` saves only at the end.

    ``callback(it, λ, F)`` gets the global step index ``it`` (counted from the first run).
    A user ``callback`` passes through ``**kwargs`` to :func:`meta_train`.
    """
    ckpt = Path(checkpoint)
    config = _run_config(problem, model, tasks, kwargs)
    remove_stray_temps(ckpt)
    state = None
    if ckpt.is_file():
        tensors, meta = load_tensors(ckpt)
        saved = meta.get(_INTERNAL + "config")
        if saved is not None and saved != config:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} belongs to a different run (differing: "
                f"{', '.join(config_diff(saved, config))}); delete it or use another path"
            )
        done = int(meta.get("step", 0))
        if done >= steps:
            return {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
        state = _state_from(problem, tensors, meta)
        if state is None:
            raise ValueError(
                f"checkpoint {str(ckpt)!r} holds parameters but no training state (written by "
                f"save_checkpoint?); pass them as init= with a fresh checkpoint path"
            )
    every = int(every)

    def on_step(k: int, snapshot: Any) -> None:
        if every and k % every == 0 and k < steps:
            _save_state(ckpt, problem, snapshot(), config)

    final: list[TrainState] = []

    def on_step_last(k: int, snapshot: Any) -> None:
        on_step(k, snapshot)
        if k == steps:
            final[:] = [snapshot()]

    out = meta_train(
        problem,
        model,
        tasks,
        steps=steps,
        state=state,
        on_step=on_step_last,
        **kwargs,
    )
    if final:
        _save_state(ckpt, problem, final[0], config)
    else:  # early stop (tol) or newton: the state is λ alone (a rerun stops/continues alike)
        opt = str(kwargs.get("optimizer", "adam"))
        _save_state(ckpt, problem, TrainState(int(steps), problem.flat(out), opt), config)
    return out
