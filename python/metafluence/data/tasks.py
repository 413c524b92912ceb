"""Few-shot tasks and their stacked, weighted batches.

A :class:`Task` holds one support set ``S = (x_s [n, ...], y_s [n])`` and one query set
``Q = (x_q [m, ...], y_q [m])``. A :class:`TaskBatch` stacks ``M`` tasks of identical shapes into
``[M, n, ...]`` / ``[M, m, ...]`` tensors together with the data weights of math.md §1:
``task_weight`` ``c [M]`` (default ``1/M``), ``support_weight`` ``w [M, n]`` and
``query_weight`` ``v [M, m]`` (default 1). Influence is the derivative with respect to these
weights; removing an item sets its weight to 0.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .._checks import check_finite

ITEM_KINDS = ("task", "support_point", "query_point")


@dataclass
class Task:
    """One few-shot task: ``support=(x_s, y_s)``, ``query=(x_q, y_q)`` and a stable ``id``."""

    support: tuple[Tensor, Tensor]
    query: tuple[Tensor, Tensor]
    id: Any = None
    support_weight: Tensor | None = None
    query_weight: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("support", "query"):
            pair = getattr(self, name)
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"task {self.id!r}: {name} must be a pair (x, y)")
            x, y = pair
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError(f"task {self.id!r}: {name} x and y must be tensors")
            setattr(self, name, (x, y))

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Task:
        """A copy on ``device`` with floating tensors (inputs, weights; float targets) in
        ``dtype``; integer labels keep their dtype."""
        (xs, ys), (xq, yq) = self.support, self.query
        sw, qw = self.support_weight, self.query_weight
        return replace(
            self,
            support=(_moved(xs, device, dtype), _moved(ys, device, dtype)),
            query=(_moved(xq, device, dtype), _moved(yq, device, dtype)),
            support_weight=None if sw is None else _moved(sw, device, dtype),
            query_weight=None if qw is None else _moved(qw, device, dtype),
        )


def _moved(t: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    """``t`` on ``device``; floating tensors also in ``dtype`` (labels keep theirs)."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


FIELDS = ("support x", "support y", "query x", "query y")
WEIGHTS = ("task_weight", "support_weight", "query_weight")


def _finite_rows(t: Tensor, dtype: torch.dtype | None, ids: Sequence[Any], what: str) -> Tensor:
    """``t [M, ...]`` cast to ``dtype`` (floating only), checked finite *in* ``dtype``; a
    ValueError names the first task whose row is not (and whether it overflowed)."""
    if not t.is_floating_point():
        return t
    out = t if dtype is None else t.to(dtype)
    if out.device.type == "meta" or bool(torch.isfinite(out).all()):
        return out
    bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(1)
    k = int(torch.nonzero(bad).flatten()[0])
    check_finite(t[k], f"task {ids[k]!r}: {what}", dtype)
    raise AssertionError("unreachable: check_finite raises")  # pragma: no cover


def _position(e: Any, kind: str) -> int:
    """An item position (an integer, not an id or a float)."""
    if isinstance(e, bool):
        raise TypeError(f"remove[{kind!r}] item {e!r}: expected an integer position")
    try:
        return operator.index(e.item() if isinstance(e, Tensor) else e)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"remove[{kind!r}] item {e!r}: expected integer positions (0..M-1), not ids or floats"
        ) from None


def tasks_device(tasks: Any) -> torch.device | None:
    """Device of the first task's support inputs (None when not cheaply known)."""
    if isinstance(tasks, TaskBatch):
        return tasks.xs.device
    if isinstance(tasks, Task):
        return tasks.support[0].device
    if isinstance(tasks, (list, tuple)) and tasks and isinstance(tasks[0], Task):
        return tasks[0].support[0].device
    return None


def item_masks(
    items: Mapping[str, Sequence[Any]], c: Tensor, W: Tensor, V: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Boolean masks shaped like ``(c [M], W [M, n], V [M, m])`` of the items in ``items``.

    ``items`` maps ``"task"`` to task positions ``[k, ...]`` and ``"support_point"`` /
    ``"query_point"`` to ``[(k, j), ...]`` pairs; out-of-range items raise ValueError.
    """
    masks = {
        "task": torch.zeros_like(c, dtype=torch.bool),
        "support_point": torch.zeros_like(W, dtype=torch.bool),
        "query_point": torch.zeros_like(V, dtype=torch.bool),
    }
    M = c.shape[0]
    if not isinstance(items, Mapping):
        raise TypeError(
            f"remove must be a dict kind → positions (e.g. {{'task': [0, 3]}}), got "
            f"{type(items).__name__}"
        )
    for kind, idx in items.items():
        if kind not in ITEM_KINDS:
            raise ValueError(f"item kind {kind!r}: expected one of {ITEM_KINDS}")
        if isinstance(idx, (str, bytes)) or not isinstance(idx, (Sequence, Tensor)):
            raise TypeError(
                f"remove[{kind!r}] must be a list of positions, got {type(idx).__name__}"
            )
        mask = masks[kind]
        for e in idx:
            if kind == "task":
                k = _position(e, kind)
                if not 0 <= k < M:
                    raise ValueError(f"remove['task'] index {k} outside [0, {M})")
                if mask[k]:
                    raise ValueError(f"remove['task'] lists position {k} twice")
                mask[k] = True
            else:
                if not isinstance(e, (tuple, list)) or len(e) != 2:
                    raise TypeError(f"remove[{kind!r}] item {e!r}: expected a (task, point) pair")
                k, j = (_position(v, kind) for v in e)
                if not (0 <= k < M and 0 <= j < mask.shape[1]):
                    raise ValueError(
                        f"remove[{kind!r}] item {(k, j)} outside [0,{M})×[0,{mask.shape[1]})"
                    )
                if mask[k, j]:
                    raise ValueError(f"remove[{kind!r}] lists item {(k, j)} twice")
                mask[k, j] = True
    return masks["task"], masks["support_point"], masks["query_point"]


def check_items(items: Mapping[str, Sequence[Any]], M: int, n: int, m: int) -> None:
    """Validate ``items`` (kinds, integer positions, ranges, repeats) for ``M`` tasks with ``n``
    support and ``m`` query points each, exactly as :func:`item_masks` does."""
    z = torch.zeros(M, dtype=torch.bool)
    item_masks(items, z, z.new_zeros(M, n), z.new_zeros(M, m))


@dataclass
class TaskBatch:
    """``M`` tasks stacked: ``xs [M, n, ...]``, ``ys [M, n, ...]``, ``xq [M, m, ...]``, ...

    ``ids`` keeps each task's id (used in every error message and in results).
    """

    xs: Tensor
    ys: Tensor
    xq: Tensor
    yq: Tensor
    task_weight: Tensor
    support_weight: Tensor
    query_weight: Tensor
    ids: list[Any]

    @property
    def num_tasks(self) -> int:
        return int(self.xs.shape[0])

    @property
    def n_support(self) -> int:
        return int(self.xs.shape[1])

    @property
    def n_query(self) -> int:
        return int(self.xq.shape[1])

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(c [M], w [M, n], v [M, m])``."""
        return self.task_weight, self.support_weight, self.query_weight

    def with_weights(
        self,
        task_weight: Tensor | None = None,
        support_weight: Tensor | None = None,
        query_weight: Tensor | None = None,
    ) -> TaskBatch:
        """A copy sharing the data, with some weights replaced."""
        return replace(
            self,
            task_weight=self.task_weight if task_weight is None else task_weight,
            support_weight=self.support_weight if support_weight is None else support_weight,
            query_weight=self.query_weight if query_weight is None else query_weight,
        )

    def item_masks(self, items: Mapping[str, Sequence[Any]]) -> tuple[Tensor, Tensor, Tensor]:
        """Boolean masks ``(c [M], W [M, n], V [M, m])`` of the items named in ``items``."""
        return item_masks(items, *self.weights())

    def reweighted(self, items: Mapping[str, Sequence[Any]], factor: float = 0.0) -> TaskBatch:
        """A copy with the weights of ``items`` multiplied by ``factor`` (0 = removal)."""
        masks = self.item_masks(items)
        c, W, V = (
            torch.where(m, w * factor, w) for m, w in zip(masks, self.weights(), strict=True)
        )
        return self.with_weights(c, W, V)

    def chunks(self, size: int | None) -> Iterator[TaskBatch]:
        """Consecutive batches of at most ``size`` tasks (None = one): with
        :meth:`TaskSource.chunks <metafluence.data.source.TaskSource.chunks>`, the one chunker
        (:func:`chunk_bounds`) of every computation over tasks."""
        for lo, hi in chunk_bounds(self.num_tasks, size):
            yield self.slice(lo, hi)

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` (weights kept as they are, not renormalised)."""
        return TaskBatch(
            self.xs[start:stop],
            self.ys[start:stop],
            self.xq[start:stop],
            self.yq[start:stop],
            self.task_weight[start:stop],
            self.support_weight[start:stop],
            self.query_weight[start:stop],
            self.ids[start:stop],
        )

    def select(self, index: Sequence[int]) -> TaskBatch:
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.xs.device)
        return TaskBatch(
            self.xs[idx],
            self.ys[idx],
            self.xq[idx],
            self.yq[idx],
            self.task_weight[idx],
            self.support_weight[idx],
            self.query_weight[idx],
            [self.ids[int(i)] for i in idx],
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device`` with floating tensors in ``dtype`` (as :meth:`Task.to`)."""
        fields = (self.xs, self.ys, self.xq, self.yq)
        weights = (self.task_weight, self.support_weight, self.query_weight)
        return TaskBatch(*(_moved(t, device, dtype) for t in (*fields, *weights)), list(self.ids))

    @staticmethod
    def from_tasks(
        tasks: Sequence[Task] | TaskBatch,
        task_weight: Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> TaskBatch:
        """Validate and stack ``tasks`` (all of one shape). ``task_weight`` defaults to ``1/M``.

        Raises ValueError naming the task id and the field for: mismatched shapes across tasks,
        an empty support or query set, NaN/Inf in the data, a duplicate task id.
        """
        if isinstance(tasks, TaskBatch):
            batch = check_structure(tasks)
            if task_weight is not None:
                fd = batch.task_weight.dtype
                tw = as_task_weight(task_weight, batch.num_tasks, fd, batch.task_weight.device)
                batch = batch.with_weights(task_weight=tw)
            return batch.cast_checked(dtype, device)
        if not isinstance(tasks, (list, tuple)):
            raise TypeError(
                f"tasks must be a list of mf.Task or a TaskBatch, got {type(tasks).__name__}"
            )
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks is empty: need at least one task")
        for i, t in enumerate(tasks):
            if not isinstance(t, Task):
                raise TypeError(f"tasks[{i}] is {type(t).__name__}, expected mf.Task")
        ids = [t.id if t.id is not None else i for i, t in enumerate(tasks)]
        check_ids(ids)
        ref = tasks[0]
        fields = {
            "support x": lambda t: t.support[0],
            "support y": lambda t: t.support[1],
            "query x": lambda t: t.query[0],
            "query y": lambda t: t.query[1],
        }
        for t, tid in zip(tasks, ids, strict=True):
            for fname, get in fields.items():
                v = get(t)
                if v.dim() == 0:
                    raise ValueError(f"task {tid!r}: {fname} is a scalar, expected [N, ...]")
                if v.shape[0] == 0:
                    raise ValueError(f"task {tid!r}: {fname} is empty (0 points)")
                rv = get(ref)
                if v.shape != rv.shape:
                    raise ValueError(
                        f"task {tid!r}: {fname} has shape {tuple(v.shape)}, but task {ids[0]!r} "
                        f"has {tuple(rv.shape)}; all tasks in one batch need the same shapes"
                    )
                if v.device != rv.device:
                    raise ValueError(
                        f"task {tid!r}: {fname} is on {v.device} but task {ids[0]!r}'s is on "
                        f"{rv.device}; all tasks must be on one device"
                    )
            if t.support[0].shape[0] != t.support[1].shape[0]:
                raise ValueError(
                    f"task {tid!r}: support x has {t.support[0].shape[0]} points but support y "
                    f"has {t.support[1].shape[0]}"
                )
            if t.query[0].shape[0] != t.query[1].shape[0]:
                raise ValueError(
                    f"task {tid!r}: query x has {t.query[0].shape[0]} points but query y "
                    f"has {t.query[1].shape[0]}"
                )
        xs = torch.stack([t.support[0] for t in tasks])
        ys = torch.stack([t.support[1] for t in tasks])
        xq = torch.stack([t.query[0] for t in tasks])
        yq = torch.stack([t.query[1] for t in tasks])
        fdtype = dtype or (xs.dtype if xs.is_floating_point() else torch.get_default_dtype())
        dev = device if device is not None else xs.device
        m_tasks, n, m = len(tasks), xs.shape[1], xq.shape[1]

        def weights_of(get, size: int, what: str) -> Tensor:
            rows = []
            for t, tid in zip(tasks, ids, strict=True):
                w = get(t)
                if w is None:
                    rows.append(torch.ones(size, dtype=fdtype, device=dev))
                else:
                    if tuple(w.shape) != (size,):
                        raise ValueError(
                            f"task {tid!r}: {what} has shape {tuple(w.shape)}, expected ({size},)"
                        )
                    if not isinstance(w, Tensor):
                        raise TypeError(
                            f"task {tid!r}: {what} is {type(w).__name__}, expected a tensor"
                        )
                    rows.append(w.to(device=dev))
            return torch.stack(rows)

        sw = weights_of(lambda t: t.support_weight, n, "support_weight")
        qw = weights_of(lambda t: t.query_weight, m, "query_weight")
        if task_weight is None:
            tw = torch.full((m_tasks,), 1.0 / m_tasks, dtype=fdtype, device=dev)
        else:
            tw = as_task_weight(task_weight, m_tasks, None, dev)
        batch = TaskBatch(xs, ys, xq, yq, tw, sw, qw, ids)
        return batch.cast_checked(fdtype, dev)

    def cast_checked(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> TaskBatch:
        """A copy in ``dtype`` (floating fields; the dtype the model computes in) on ``device``,
        every floating field and weight checked finite *after* the cast: a ValueError names the
        task and the field (NaN/Inf, or float64 values that overflow ``dtype``)."""
        fdtype = dtype or torch.get_default_dtype()
        weights = [w if w.is_floating_point() else w.to(fdtype) for w in self.weights()]
        fields = [self.xs, self.ys, self.xq, self.yq, *weights]
        out = [
            _finite_rows(t, dtype, self.ids, what).to(device=device)
            for t, what in zip(fields, (*FIELDS, *WEIGHTS), strict=True)
        ]
        xs, ys, xq, yq, tw, sw, qw = out
        return TaskBatch(xs, ys, xq, yq, tw, sw, qw, list(self.ids))


def as_task_weight(task_weight: Any, M: int, dtype: torch.dtype | None, device: Any) -> Tensor:
    """``c [M]`` as a real tensor (values are checked finite after the cast to the model's
    dtype, with the rest of the batch)."""
    if isinstance(task_weight, (str, bytes)) or task_weight is None:
        raise TypeError(f"task_weight must be a tensor of M={M} weights, got {task_weight!r}")
    try:
        tw = torch.as_tensor(task_weight, device=device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"task_weight must be a tensor of M={M} weights: {e}") from None
    if tw.dtype == torch.bool or tw.is_complex():
        raise TypeError(f"task_weight has dtype {tw.dtype}, expected real weights")
    if tuple(tw.shape) != (M,):
        raise ValueError(f"task_weight has shape {tuple(tw.shape)}, expected ({M},)")
    if dtype is not None or not tw.is_floating_point():
        tw = tw.to(dtype or torch.get_default_dtype())
    return tw


def check_structure(b: TaskBatch) -> TaskBatch:
    """``b`` if its fields fit together (``xs [M, n, ...]``, ``ys [M, n, ...]``, ``xq [M, m,
    ...]``, ``yq [M, m, ...]``, ``task_weight [M]``, ``support_weight [M, n]``,
    ``query_weight [M, m]``, ``M`` unique hashable ids, one device); else a ValueError /
    TypeError naming the field and the expected shape."""
    names = ("xs", "ys", "xq", "yq", "task_weight", "support_weight", "query_weight")
    vals = (b.xs, b.ys, b.xq, b.yq, b.task_weight, b.support_weight, b.query_weight)
    for name, v in zip(names, vals, strict=True):
        if not isinstance(v, Tensor):
            raise TypeError(f"TaskBatch.{name} is {type(v).__name__}, expected a tensor")
        if v.device != b.xs.device:
            raise ValueError(f"TaskBatch.{name} is on {v.device} but xs is on {b.xs.device}")
    for name, v in zip(names[:4], vals[:4], strict=True):
        if v.dim() < 2:
            raise ValueError(f"TaskBatch.{name} has shape {tuple(v.shape)}, expected [M, N, ...]")
    M, n, m = b.num_tasks, b.n_support, b.n_query
    if M == 0:
        raise ValueError("tasks is empty: need at least one task")
    if n == 0 or m == 0:
        raise ValueError(f"TaskBatch has {n} support and {m} query points per task: need >= 1")
    # leading dims each field must have (data: then any feature dims; weights: exactly these)
    want = {
        "ys": (M, n),
        "xq": (M, m),
        "yq": (M, m),
        "task_weight": (M,),
        "support_weight": (M, n),
        "query_weight": (M, m),
    }
    for name, v in zip(names, vals, strict=True):
        if name not in want:
            continue
        lead, weight = want[name], name.endswith("weight")
        if tuple(v.shape[: len(lead)]) != lead or weight and v.dim() != len(lead):
            expected = lead if weight else (*lead, "...")
            raise ValueError(f"TaskBatch.{name} has shape {tuple(v.shape)}, expected {expected}")
        if weight and (v.dtype == torch.bool or v.is_complex()):
            raise TypeError(f"TaskBatch.{name} has dtype {v.dtype}, expected real weights")
    if not isinstance(b.ids, (list, tuple)) or len(b.ids) != M:
        raise ValueError(f"TaskBatch.ids must be a list of M={M} task ids, got {b.ids!r}")
    check_ids(b.ids)
    return b


def check_ids(ids: Sequence[Any]) -> None:
    """Task ids must be hashable and unique (TypeError / ValueError naming the task)."""
    seen: dict[Any, int] = {}
    for i, tid in enumerate(ids):
        try:
            hash(tid)
        except TypeError:
            raise TypeError(f"task {i}: id {tid!r} is not hashable") from None
        if tid in seen:
            raise ValueError(f"duplicate task id {tid!r} (tasks {seen[tid]} and {i})")
        seen[tid] = i


def chunk_bounds(n: int, size: int | None) -> Iterator[tuple[int, int]]:
    """``[lo, hi)`` of consecutive chunks of at most ``size`` of ``n`` tasks (``None``: one chunk
    of all ``n``; ``n = 0``: none). ``size`` is validated once, where it enters
    (``MetaProblem(chunk_size=...)``)."""
    step = n if size is None else int(size)
    for lo in range(0, n, max(step, 1)):
        yield lo, min(n, lo + step)
