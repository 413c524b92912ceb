"""Resumable removal effects: the progress store of :func:`~metafluence.removal_effects`.

A run with ``checkpoint_dir`` keeps three stages in a :class:`~metafluence._store.ProgressStore`
(atomic, checksummed files; a damaged one is reported and recomputed, never used):

- ``solve``: the target gradient ``∇f [P]`` and the total solve ``s = (H + δ'I)⁻¹ ∇f`` with the
  :class:`SolveResult` fields (``info`` entries that are neither tensors nor JSON are dropped);
- ``scores-<start>-<stop>``: the three score blocks ``([k], [k, n], [k, m])`` of each chunk of
  tasks (global positions ``start:stop``);
- ``diagnostics`` / ``no-diagnostics``: ``‖∇F(λ*)‖`` and the diagnostics dict (JSON meta).

The store's config fingerprints everything that determines these numbers (see
:func:`scores_config`); reopening it with different inputs raises ``ValueError`` naming the keys.
Every file carries its identity inside it (:meth:`ProgressStore.save`): the store's config hash
(so a ``solve`` copied from a store with another ``solve_damping`` is refused), its key, and for
a scores chunk its range and a digest of its tasks. A file that does not match is reported with a
``RuntimeWarning`` naming it and recomputed.

Under ``torch.distributed`` every rank keeps its own subdirectory ``rank<r>-of-<world>``, and a
stage whose computation involves collectives (the solve, the diagnostics) is loaded only when
every rank has it, so the ranks stay in lock step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .._store import ProgressStore, digest
from ..bilevel._tape import ProductTape
from ..bilevel.point import BilevelPoint, batch_digest
from ..solvers import SolveResult

SOLVE, DIAG, NO_DIAG = "solve", "diagnostics", "no-diagnostics"
Blocks = tuple[Tensor, Tensor, Tensor]


def is_callable_target(target: Any) -> bool:
    """A callable ``f(meta_params)`` rather than target tasks."""
    return callable(target) and not isinstance(target, Sequence)


def _target_fingerprint(target: Any, grad_f: Tensor | None) -> dict[str, Any]:
    if is_callable_target(target):
        assert grad_f is not None, "a callable target is fingerprinted by its gradient"
        name = getattr(target, "__qualname__", type(target).__qualname__)
        return {"callable": name, "grad": digest(grad_f)}
    return {"tasks": digest(target, strict=False)}


def scores_config(
    problem: Any,
    pt: BilevelPoint,
    target: Any,
    grad_f: Tensor | None,
    curvature: Any,
    lanczos_steps: int,
    newton_check: int = 0,
) -> dict[str, Any]:
    """The config a removal-effects store is bound to.

    λ*, the tasks (:meth:`BilevelPoint.tasks_fingerprint`), the chunking, the target (list-like:
    a digest of its tasks; callable: its name and a digest of ``∇f(λ*)``, passed as ``grad_f``),
    the curvature (:meth:`Curvature.config`: kind, method, solver and its arguments, ``δ'``, a
    digest of a fitted factorisation), the Lanczos steps, the Newton-check size and the
    problem's ``repr`` (model type, loss, inner map, damping, ``P``). ``items`` is not part of
    it: every run stores all three score kinds. A solver argument that cannot be fingerprinted
    (e.g. a callable) is recorded by its type only: use a new directory when changing it.
    """
    return {
        "stage": "removal_effects",
        "problem": repr(problem),
        "meta_params": digest(pt.lam),
        "dtype": str(pt.lam.dtype),
        "train_tasks": pt.tasks_fingerprint(),
        "chunk_size": pt.chunk_size,
        "target": _target_fingerprint(target, grad_f),
        **curvature.config(),
        "lanczos_steps": int(lanczos_steps),
        "newton_check": int(newton_check),
    }


def open_store(
    checkpoint_dir: str | os.PathLike, pt: BilevelPoint, config: Mapping[str, Any]
) -> ProgressStore:
    """The store (a per-rank subdirectory when the point spans several processes)."""
    d = Path(checkpoint_dir)
    world = int(pt.reduce.world)
    if world > 1:
        d = d / f"rank{int(getattr(pt.reduce, 'rank', 0))}-of-{world}"
    return ProgressStore(d, config)


def everywhere(pt: BilevelPoint, have: bool) -> bool:
    """Whether every process ``have``-s a stage (single process: ``have``)."""
    if pt.reduce.world == 1:
        return have
    n = pt.reduce.sum(pt.lam.new_tensor(1.0 if have else 0.0))
    return int(round(float(n))) == pt.reduce.world


# ---- stage (a): the target gradient and the total solve --------------------------------------
def save_solve(store: ProgressStore, grad_f: Tensor, res: SolveResult, tape: bool = False) -> None:
    """The ``solve`` stage; ``tape``: its scores were read off its products (saved first)."""
    tensors = {"target_grad": grad_f, "x": res.x, "residual": res.residual}
    if res.column_converged is not None:
        tensors["column_converged"] = res.column_converged
    info: dict[str, Any] = {}
    for k, v in res.info.items():
        if isinstance(v, Tensor):
            tensors[f"info.{k}"] = v
            continue
        try:
            json.dumps(v, allow_nan=True)
        except (TypeError, ValueError):
            continue
        info[k] = v
    meta = {
        "iters": int(res.iters),
        "converged": bool(res.converged),
        "negative_curvature": bool(res.negative_curvature),
        "info": info,
        "info_order": list(res.info),
        "tape": bool(tape),
    }
    store.save(SOLVE, tensors, meta)


def load_solve(
    got: tuple[dict[str, Tensor], dict[str, Any]], like: Tensor
) -> tuple[Tensor, SolveResult]:
    """``(∇f, SolveResult)`` back from a ``solve`` stage, on ``like``'s device."""
    t, meta = got
    dev = like.device
    tensor_info = {k[5:]: v.to(dev) for k, v in t.items() if k.startswith("info.")}
    merged = {**meta["info"], **tensor_info}
    info = {k: merged[k] for k in meta["info_order"] if k in merged}
    cc = t.get("column_converged")
    res = SolveResult(
        x=t["x"].to(dev),
        iters=int(meta["iters"]),
        residual=t["residual"].to(dev),
        converged=bool(meta["converged"]),
        column_converged=None if cc is None else cc.to(dev),
        negative_curvature=bool(meta["negative_curvature"]),
        info=info,
    )
    return t["target_grad"].to(dev), res


# ---- stage (b): item scores per chunk of tasks -----------------------------------------------
def chunk_key(start: int, stop: int) -> str:
    return f"scores-{start:08d}-{stop:08d}"


def chunked_item_scores(
    pt: BilevelPoint,
    s: Tensor,
    store: ProgressStore | None,
    tape: Callable[[], ProductTape | None] | None = None,
) -> Blocks:
    """:meth:`BilevelPoint.item_scores` chunk by chunk, each chunk saved in / loaded from ``store``
    (read off the tape ``tape()`` gives, asked when the first chunk is computed, when ``s`` lies
    in the span of its products: no pass, no engine built).

    A stored chunk is used only when its checksum, its identity (the store's config, the
    chunk's range ``start:stop`` and a digest of its tasks and weights: a chunk file copied
    over another is refused with a ``RuntimeWarning`` naming it), the solve ``s`` it was
    computed with (a digest in its meta) and its shapes (``[k]``, ``[k, n]``, ``[k, m]``,
    ``λ``'s dtype) match; its engine is then never built (a streamed point does not adapt its
    tasks).
    """
    s_digest = digest(s) if store is not None else None
    parts: list[Blocks] = []
    taped: tuple[ProductTape, Tensor] | None = None
    asked = tape is None
    stored: list[tuple[dict[str, Any] | None, Blocks | None]] | None = None
    if tape is not None and store is not None and pt.reduce.world > 1:
        # a stored solve's tape is made again by collective products: when any process lacks
        # a chunk, every process takes part (tape() is cached: the loop below reuses it, and
        # the chunks read here)
        chunks = pt.chunk_engines()
        stored = [_stored_chunk(store, lo, hi, b, s_digest, pt) for (lo, hi), b in chunks]
        if not everywhere(pt, all(got is not None for _, got in stored)):
            tape()
    for i, ((lo, hi), build) in enumerate(pt.chunk_engines()):
        if stored is not None:
            ident, loaded = stored[i]
        else:
            ident, loaded = _stored_chunk(store, lo, hi, build, s_digest, pt)
        if loaded is not None:
            parts.append(loaded)
            continue
        if not asked and tape is not None:
            asked, got_tape = True, tape()
            a = got_tape.coefficients(s) if got_tape is not None else None
            taped = None if a is None or got_tape is None else (got_tape, a)
        if taped is not None:
            t_c, s_c, q_c = pt.weighted_item_blocks(build.batch, taped[0].chunk_blocks(i, taped[1]))
        else:
            t_c, s_c, q_c = pt.chunk_item_scores(build(), s)
        blocks = (t_c.detach(), s_c.detach(), q_c.detach())
        if store is not None:
            names = ("task", "support_point", "query_point")
            meta = {"start": lo, "stop": hi, "s": s_digest}
            store.save(chunk_key(lo, hi), dict(zip(names, blocks, strict=True)), meta, ident)
        parts.append(blocks)
    return pt.cat_items(parts)


def _stored_chunk(
    store: ProgressStore | None, lo: int, hi: int, build: Any, s_digest: Any, pt: BilevelPoint
) -> tuple[dict[str, Any] | None, Blocks | None]:
    """``(identity, blocks)`` of chunk ``lo:hi`` in ``store`` (blocks ``None`` when absent, of
    another solve, another computation or damaged)."""
    if store is None:
        return None, None
    n, m = pt.item_widths()
    ident = {"range": [lo, hi], "tasks": batch_digest(build.batch)}
    got = store.get(chunk_key(lo, hi), ident)
    if got is None or got[1].get("s") != s_digest:
        return ident, None
    return ident, _checked_blocks(got[0], hi - lo, n, m, pt.lam)


def _checked_blocks(t: dict[str, Tensor], k: int, n: int, m: int, lam: Tensor) -> Blocks | None:
    want = {"task": (k,), "support_point": (k, n), "query_point": (k, m)}
    for name, shape in want.items():
        x = t.get(name)
        if x is None or tuple(x.shape) != shape or x.dtype != lam.dtype:
            return None
    return tuple(t[name].to(lam.device) for name in want)  # type: ignore[return-value]


# ---- stage (c): diagnostics ------------------------------------------------------------------
def diag_key(diagnostics: bool) -> str:
    return DIAG if diagnostics else NO_DIAG


def save_diagnostics(
    store: ProgressStore,
    diagnostics: bool,
    s: Tensor,
    meta_grad_norm: float,
    diag: dict[str, Any],
) -> None:
    meta = {"meta_grad_norm": meta_grad_norm, "diagnostics": diag, "s": digest(s)}
    store.save(diag_key(diagnostics), {}, meta)


def load_diagnostics(
    store: ProgressStore, diagnostics: bool, s: Tensor
) -> tuple[float, dict[str, Any]] | None:
    """``(‖∇F(λ*)‖, diagnostics)`` if stored for this solve ``s`` (they report its health)."""
    got = store.get(diag_key(diagnostics))
    if got is None or got[1].get("s") != digest(s):
        return None
    return float(got[1]["meta_grad_norm"]), dict(got[1]["diagnostics"])
