"""Leave-group-out ground truth: remove a set of items, retrain, record the true change.

A *group* is a mapping ``{kind: items}`` with ``kind`` in ``"task"`` (task positions ``k``),
``"support_point"`` / ``"query_point"`` (``(k, j)`` pairs) — the same form as ``remove=`` of
:func:`metafluence.param_influence` — or, with ``items=`` given, a plain list of items of
that kind. Every removed item's weight is multiplied by ``factor`` (0 = removal; the other
weights are unchanged, as in the influence derivation of math.md §3), the meta-parameters are
retrained with the same stopping rule, and

    Δf_{-R} = f(λ*_{-R}) − f(λ*)          (and optionally Δλ_{-R} = λ*_{-R} − λ*)

is recorded. To first order ``Δf_{-R} ≈ Σ_{e∈R} removal_effect(e)`` (math.md §3).

Retrainers (``retrain(batch, start) -> params``):

- :func:`metafluence.evaluate.newton_retrain` (default; warm start at ``λ*``, dense Newton,
  ``proximal=δ'`` for the proximal response): small ``P``;
- :func:`meta_train_retrain`: ``meta_train`` from the *same* initialisation and seed, for
  larger models (ignores ``start``).

``workers > 1`` spreads groups over processes (``fork`` start method: the problem and the
retrainer are inherited, not pickled; each worker uses one torch thread).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch import Tensor

from .._store import ProgressStore, map_chunks
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..data.source import TaskSource
from ..data.tasks import TaskBatch
from ..influence.removal import ITEMS, TargetLike
from ..train._bar import progress_bar
from ..train.meta_train import meta_train
from .loo import Retrain, newton_retrain, stage_fingerprint, target_value

Group = Mapping[str, Sequence[Any]] | Sequence[Any]


def normalize_group(group: Group, items: str | None = None) -> dict[str, list[Any]]:
    """``{kind: [items]}`` from a mapping or (with ``items``) a plain list of one kind."""
    if isinstance(group, Mapping):
        out = {str(k): list(v) for k, v in group.items()}
    else:
        if items is None:
            raise ValueError("a plain list of items needs items='task'|'support_point'|...")
        out = {items: list(group)}
    for kind in out:
        if kind not in ITEMS:
            raise ValueError(f"group kind {kind!r}: expected one of {ITEMS}")
    return out


def group_reweighted(
    batch: TaskBatch, group: Group, factor: float = 0.0, items: str | None = None
) -> TaskBatch:
    """``batch`` with every item of ``group`` reweighted by ``factor`` (0 = removal)."""
    return batch.reweighted(normalize_group(group, items), factor)


def predicted_group_effects(
    scores: Tensor | Sequence[Tensor],
    groups: Sequence[Group],
    items: str | None = None,
    all_scores: Mapping[str, Any] | None = None,
) -> Tensor:
    """First-order prediction ``Σ_{e∈R} removal_effect(e)`` for each group ``R``.

    ``scores``: task scores ``[M]`` or per-task point-score lists of the kind ``items``; or pass
    ``all_scores`` (``InfluenceResult.all_scores``) for groups mixing kinds.
    """
    out = []
    for grp in groups:
        g = normalize_group(grp, items)
        tot = 0.0
        for kind, idx in g.items():
            src = all_scores[kind] if all_scores is not None else scores
            for e in idx:
                if kind == "task":
                    tot += float(src[int(e)])
                else:
                    tot += float(src[int(e[0])][int(e[1])])
        out.append(tot)
    return torch.tensor(out, dtype=torch.float64)


def meta_train_retrain(problem: MetaProblem, init: ParamsLike, **train_kwargs: Any) -> Retrain:
    """Retrainer: ``meta_train`` from the same ``init`` and seed (``train_kwargs`` as used for
    ``λ*``: ``steps``, ``outer_lr``, ``optimizer``, ``seed``, ``batch_size``, ``tol``)."""
    lam0 = problem.flat(init).clone()

    def retrain(batch: TaskBatch | TaskSource, start: dict[str, Tensor]) -> dict[str, Tensor]:
        return meta_train(problem, None, batch, init=lam0, **train_kwargs)

    return retrain


# --- process pool (fork: the state is inherited, never pickled) -----------------------------
_STATE: dict[str, Any] = {}


def _one(i: int) -> tuple[float, Tensor]:
    st = _STATE
    b = group_reweighted(st["batch"], st["groups"][i], st["factor"], st["items"])
    new = st["problem"].flat(st["retrain"](b, st["start"]))
    return target_value(st["problem"], new, st["target"]) - st["f0"], (new - st["lam"])


def _chunk(r: tuple[int, int]) -> dict[str, Tensor]:
    """Groups ``r[0]:r[1]`` → ``{"df": [n] float64, "dl": [n, P]}``."""
    res = [_one(i) for i in range(*r)]
    lam = _STATE["lam"]
    return {
        "df": torch.tensor([x[0] for x in res], dtype=torch.float64),
        "dl": torch.stack([x[1] for x in res]) if res else lam.new_zeros(0, lam.numel()),
    }


def _init_worker() -> None:
    torch.set_num_threads(1)


def _pooled(
    n: int, chunk_size: int, store: ProgressStore | None, bar: Any, workers: int
) -> list[dict[str, Tensor]] | None:
    """:func:`map_chunks` over a fork pool; ``None`` if a worker died (the caller then finishes
    in this process: chunks already saved to ``store`` are not recomputed).

    A ``concurrent.futures`` pool notices a worker that dies (e.g. a child forked while another
    thread of this process held a lock) instead of waiting for its result forever.
    """
    ctx = mp.get_context("fork")
    n_chunks = -(-n // max(int(chunk_size), 1))
    try:
        with ProcessPoolExecutor(
            min(workers, n_chunks), mp_context=ctx, initializer=_init_worker
        ) as pool:
            return map_chunks(
                _chunk, n, chunk_size, store, imap=lambda f, rs: pool.map(f, rs), progress=bar
            )
    except BrokenProcessPool as exc:
        warnings.warn(
            f"leave_group_out: a worker process died ({exc}); finishing in this process",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def leave_group_out(
    problem: MetaProblem,
    meta_params: ParamsLike,
    train_tasks: TasksLike,
    target: TargetLike,
    groups: Sequence[Group],
    items: str | None = None,
    retrain: Retrain | None = None,
    factor: float = 0.0,
    workers: int = 1,
    return_params: bool = False,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    chunk_size: int = 1,
) -> Tensor | tuple[Tensor, Tensor]:
    """True ``Δf_{-R}`` for each group ``R`` in ``groups`` → ``[len(groups)]`` (float64).

    Args:
        groups: each a ``{kind: items}`` mapping, or (with ``items``) a list of items.
        retrain: ``retrain(batch, start_params) -> params``; default :func:`newton_retrain`.
        factor: weight multiplier of the group's items (0 = removal, ``1 ± ε`` infinitesimal).
        workers: processes (fork); 1 = in this process.
        return_params: also return ``Δλ_{-R}`` ``[len(groups), P]``.
        checkpoint_dir: save every ``chunk_size`` finished groups atomically there and, on a
            rerun, load them instead of retraining (identical result; see
            :func:`~metafluence.evaluate.leave_one_out`).
    """
    lam = problem.flat(meta_params)
    batch = problem.batch(train_tasks, lam)
    groups = [normalize_group(g, items) for g in groups]
    _STATE.update(
        problem=problem,
        batch=batch,
        groups=groups,
        factor=float(factor),
        items=items,
        retrain=newton_retrain(problem) if retrain is None else retrain,
        start=problem.unflat(lam),
        target=target,
        f0=target_value(problem, lam, target),
        lam=lam,
    )
    n = len(groups)
    store = None
    if checkpoint_dir is not None:
        config = {
            "stage": "leave_group_out",
            "groups": _STATE["groups"],
            "factor": float(factor),
            "chunk_size": int(chunk_size),
            **stage_fingerprint(lam, train_tasks, target, _STATE["f0"], retrain or newton_retrain),
        }
        store = ProgressStore(checkpoint_dir, config)
    bar = progress_bar(n, progress, "leave-group-out")
    try:
        chunks = None
        if workers > 1 and n > 1 and "fork" in mp.get_all_start_methods():
            chunks = _pooled(n, chunk_size, store, bar, int(workers))
        if chunks is None:
            chunks = map_chunks(_chunk, n, chunk_size, store, progress=bar)
    finally:
        _STATE.clear()
        if bar is not None:
            bar.close()
    df = torch.cat([c["df"] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.float64)
    if not return_params:
        return df
    if not chunks:
        return df, lam.new_zeros(0, lam.numel())
    return df, torch.cat([c["dl"] for c in chunks]).to(device=lam.device, dtype=lam.dtype)


def relative_error(pred: Tensor, truth: Tensor) -> float:
    """``‖pred − truth‖ / ‖truth‖`` (flattened; for Δλ rows or Δf vectors)."""
    p, t = pred.detach().double().reshape(-1), truth.detach().double().reshape(-1)
    d = float(t.norm())
    return float((p - t).norm()) / d if d > 0 else float("nan")
