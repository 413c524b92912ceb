"""Checkpoints of meta-parameters and resumable meta-training.

Files are safetensors when the ``safetensors`` package is installed (suffix ``.safetensors``),
else ``torch.save`` files loaded with ``weights_only=True`` (no code runs on load). Writes are
atomic (temporary file + ``os.replace``), so an interrupted run never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..bilevel.problem import MetaProblem, TasksLike
from .meta_train import meta_train


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
    """Atomically write ``meta_params`` (+ a JSON-able ``meta`` dict, e.g. the step)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in meta_params.items()}
    info = {k: json.dumps(v) for k, v in dict(meta or {}).items()}
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=info)
        else:
            torch.save({"meta_params": tensors, "meta": info}, tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(meta_params, meta)`` from :func:`save_checkpoint` (safe: no pickled code runs)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            params = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            raw = fh.metadata() or {}
    else:
        blob = torch.load(p, map_location="cpu", weights_only=True)
        params, raw = blob["meta_params"], blob.get("meta", {})
    return params, {k: json.loads(v) for k, v in raw.items()}


def default_checkpoint_path(directory: str | os.PathLike, name: str = "meta_params") -> Path:
    suffix = ".safetensors" if _has_safetensors() else ".pt"
    return Path(directory) / f"{name}{suffix}"


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

    On resume the remaining ``steps - done`` steps run from the saved parameters (optimizer
    state restarts; mini-batch order continues from the seed offset by the steps done, so a
    resumed run is close to, not bit-identical with, an uninterrupted one unless it is full
    batch with SGD). A finished checkpoint (``done == steps``) is returned as is.
    """
    ckpt = Path(checkpoint)
    done, init = 0, kwargs.pop("init", None)
    if ckpt.is_file():
        params, meta = load_checkpoint(ckpt)
        done = int(meta.get("step", 0))
        init = params
        if done >= steps:
            return params
    seed = int(kwargs.pop("seed", 0)) + done
    user_cb = kwargs.pop("callback", None)

    def callback(it: int, lam: Tensor, f: float) -> None:
        step = done + it + 1
        if every and step % int(every) == 0 and step < steps:
            save_checkpoint(ckpt, problem.unflat(lam), {"step": step, "F": f})
        if user_cb is not None:
            user_cb(it, lam, f)

    out = meta_train(
        problem, model, tasks, steps=steps - done, init=init, seed=seed, callback=callback, **kwargs
    )
    save_checkpoint(ckpt, out, {"step": steps})
    return out
