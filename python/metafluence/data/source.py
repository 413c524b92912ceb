"""Task sources: tasks read chunk by chunk, never all stacked at once.

A :class:`TaskBatch` holds ``M`` tasks as stacked tensors; for 10⁵ tasks of images that does not
fit in memory. A :class:`TaskSource` keeps only the order, the ids and the weights, and turns any
range of tasks into a :class:`TaskBatch` on demand, so every reduction over tasks
(``Σ_i c_i g_i``, ``Σ_i c_i H_i d``) streams over chunks of ``chunk_size`` tasks with bounded
memory and time linear in ``M``.

``tasks`` may be a dataset (``len`` + ``__getitem__`` returning :class:`Task`) — random access,
so shards and mini-batches read only their tasks — or an iterable that can be iterated more than
once (every ``iter()`` starts again from the first task). A one-shot iterator cannot serve the
several passes an influence computation makes and is refused.

Weights follow :class:`TaskBatch`: ``c_i = 1/M`` over the *whole* source unless ``task_weight``
is given, support/query weights from each task (default 1). Positions are global: a shard
``source.shard(lo, hi)`` keeps the ids, weights and item positions of the full source.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._checks import check_finite
from .tasks import Task, TaskBatch, as_task_weight, check_items, chunk_bounds

Removal = tuple[dict[str, list[Any]], float]


def _is_random_access(tasks: Any) -> bool:
    return hasattr(tasks, "__len__") and hasattr(tasks, "__getitem__")


class TaskSource:
    """``M`` tasks in a fixed order, materialised as :class:`TaskBatch` chunks on demand.

    Args:
        tasks: a dataset (``len`` + ``__getitem__`` → :class:`Task`) or a re-iterable iterable.
        task_weight: ``c [M]`` (default ``1/M``).

    Construction makes one validating pass that reads every task once (ids, shapes): duplicate
    ids, an empty source, mismatched shapes and non-:class:`Task` items raise ValueError/TypeError
    naming the task; values (NaN/Inf, labels) are checked chunk by chunk when read.
    """

    def __init__(self, tasks: Sequence[Task] | Iterable[Task], task_weight: Tensor | None = None):
        if isinstance(tasks, (TaskBatch, Task)):
            raise TypeError("TaskSource wraps a dataset or iterable of Task, not a TaskBatch/Task")
        random_access = _is_random_access(tasks)
        if not random_access:
            if not isinstance(tasks, Iterable):
                raise TypeError(
                    f"train_tasks of type {type(tasks).__name__} is neither a sequence nor an "
                    "iterable of mf.Task"
                )
            if iter(tasks) is tasks:
                raise TypeError(
                    "train_tasks is a one-shot iterator (e.g. a generator): influence makes "
                    "several passes over the tasks; pass a list, a dataset (len + __getitem__) or "
                    "an iterable whose iter() starts again"
                )
        self._tasks = tasks
        self._random_access = random_access
        ids: list[Any] = []
        seen: dict[Any, int] = {}
        shapes: tuple | None = None
        first_id: Any = None
        for i, t in enumerate(self._iter_all()):
            if not isinstance(t, Task):
                raise TypeError(f"train_tasks item {i} is {type(t).__name__}, expected mf.Task")
            tid = t.id if t.id is not None else i
            if tid in seen:
                raise ValueError(f"duplicate task id {tid!r} (tasks {seen[tid]} and {i})")
            seen[tid] = i
            ids.append(tid)
            sh = (
                tuple(t.support[0].shape),
                tuple(t.support[1].shape),
                tuple(t.query[0].shape),
                tuple(t.query[1].shape),
            )
            if shapes is None:
                shapes, first_id = sh, tid
            elif sh != shapes:
                raise ValueError(
                    f"task {tid!r}: support/query shapes {sh} differ from task {first_id!r}'s "
                    f"{shapes}; all tasks need the same shapes"
                )
        if not ids:
            raise ValueError("tasks is empty: need at least one task")
        assert shapes is not None
        self.ids: list[Any] = ids
        self.n_support, self.n_query = int(shapes[0][0]), int(shapes[2][0])
        M = len(ids)
        self._lo, self._hi = 0, M
        self._task_weight = None if task_weight is None else self._check_weight(task_weight, M)
        self._removals: list[Removal] = []

    @staticmethod
    def _check_weight(task_weight: Tensor, M: int) -> Tensor:
        # a first check in the given dtype; each chunk is checked again after the cast to the
        # model's dtype (TaskBatch.from_tasks)
        return check_finite(as_task_weight(task_weight, M, None, None), "task_weight")

    # ---- size and positions -------------------------------------------------------------
    @property
    def total_tasks(self) -> int:
        """``M`` of the whole source (the shard's ``c_i = 1/M`` uses it)."""
        return len(self.ids)

    @property
    def num_tasks(self) -> int:
        """Tasks in this (possibly sharded) source."""
        return self._hi - self._lo

    @property
    def offset(self) -> int:
        """Global position of this source's first task."""
        return self._lo

    def __len__(self) -> int:
        return self.num_tasks

    def _copy(self) -> TaskSource:
        new = object.__new__(TaskSource)
        new.__dict__.update(self.__dict__)
        new._removals = list(self._removals)
        return new

    def shard(self, start: int, stop: int) -> TaskSource:
        """Tasks ``start:stop`` of this source (global ids, weights and positions kept)."""
        if not 0 <= start <= stop <= self.num_tasks:
            raise ValueError(f"shard({start}, {stop}) outside [0, {self.num_tasks}]")
        new = self._copy()
        new._lo, new._hi = self._lo + start, self._lo + stop
        return new

    def with_task_weight(self, task_weight: Tensor | None) -> TaskSource:
        """A copy with ``c [M_total]`` replaced (None keeps the current weights)."""
        if task_weight is None:
            return self
        new = self._copy()
        new._task_weight = self._check_weight(task_weight, self.total_tasks)
        return new

    def reweighted(self, items: Mapping[str, Sequence[Any]], factor: float = 0.0) -> TaskSource:
        """A copy with the weights of ``items`` (global positions) multiplied by ``factor``."""
        check_items(items, self.total_tasks, self.n_support, self.n_query)
        new = self._copy()
        new._removals.append(({k: list(v) for k, v in items.items()}, float(factor)))
        return new

    # ---- reading --------------------------------------------------------------------------
    def _iter_all(self) -> Iterator[Task]:
        if self._random_access:
            return (self._tasks[i] for i in range(len(self._tasks)))  # type: ignore[index,arg-type]
        return iter(self._tasks)

    def _iter_range(self, lo: int, hi: int) -> Iterator[Task]:
        if self._random_access:
            return (self._tasks[i] for i in range(lo, hi))  # type: ignore[index]
        return itertools.islice(iter(self._tasks), lo, hi)

    def _stack(
        self, tasks: list[Task], lo: int, dtype: torch.dtype | None, device: Any
    ) -> TaskBatch:
        """Tasks at global positions ``lo, lo+1, ...`` as a validated, weighted batch."""
        hi = lo + len(tasks)
        c = (
            torch.full((len(tasks),), 1.0 / self.total_tasks, dtype=torch.float64)
            if self._task_weight is None
            else self._task_weight[lo:hi]
        )
        b = TaskBatch.from_tasks(tasks, task_weight=c, dtype=dtype, device=device)
        b.ids = self.ids[lo:hi]
        shapes = (b.n_support, b.n_query)
        if shapes != (self.n_support, self.n_query):  # a dataset that changed under us
            raise ValueError(f"tasks {b.ids[0]!r}..: sizes {shapes} changed since validation")
        for items, factor in self._removals:
            local = _localise(items, lo, hi)
            if local:
                b = b.reweighted(local, factor)
        return b

    def chunks(
        self, size: int | None, dtype: torch.dtype | None = None, device: Any = None
    ) -> Iterator[TaskBatch]:
        """This source's tasks as consecutive batches of at most ``size`` tasks (None = one),
        read one chunk at a time (the chunks of :func:`~metafluence.data.tasks.chunk_bounds`)."""
        it = self._iter_range(self._lo, self._hi)
        for lo, hi in chunk_bounds(self._hi - self._lo, size):
            part = list(itertools.islice(it, hi - lo))
            if len(part) < hi - lo:
                raise ValueError(
                    f"train_tasks ended after {self._lo + lo + len(part)} tasks; expected "
                    f"{self._hi}"
                )
            batch = self._stack(part, self._lo + lo, dtype, device)
            del part  # only one chunk of drawn tasks alive at a time
            yield batch
            del batch

    def select(
        self, index: Sequence[int], dtype: torch.dtype | None = None, device: Any = None
    ) -> TaskBatch:
        """Tasks at local positions ``index`` as one batch (global weights kept)."""
        if not self._random_access:
            raise TypeError(
                "selecting tasks (mini-batches) needs a dataset with len + __getitem__, "
                f"not an iterable of type {type(self._tasks).__name__}"
            )
        parts = [
            self._stack([self._tasks[self._lo + int(i)]], self._lo + int(i), dtype, device)  # type: ignore[index]
            for i in index
        ]
        return concat_batches(parts)

    def __repr__(self) -> str:
        return (
            f"TaskSource({type(self._tasks).__name__}, tasks {self._lo}:{self._hi} of "
            f"{self.total_tasks}, n={self.n_support}, m={self.n_query})"
        )


def _localise(items: Mapping[str, Sequence[Any]], lo: int, hi: int) -> dict[str, list[Any]]:
    """Global item positions in ``[lo, hi)`` shifted to chunk-local ones."""
    out: dict[str, list[Any]] = {}
    for kind, idx in items.items():
        sel: list[Any]
        if kind == "task":
            sel = [int(k) - lo for k in idx if lo <= int(k) < hi]
        else:
            sel = [(int(k) - lo, int(j)) for k, j in idx if lo <= int(k) < hi]
        if sel:
            out[kind] = sel
    return out


def concat_batches(parts: Sequence[TaskBatch]) -> TaskBatch:
    """Stack batches of one shape along the task dimension."""
    if not parts:
        raise ValueError("no batches to concatenate")
    if len(parts) == 1:
        return parts[0]
    return TaskBatch(
        torch.cat([p.xs for p in parts]),
        torch.cat([p.ys for p in parts]),
        torch.cat([p.xq for p in parts]),
        torch.cat([p.yq for p in parts]),
        torch.cat([p.task_weight for p in parts]),
        torch.cat([p.support_weight for p in parts]),
        torch.cat([p.query_weight for p in parts]),
        [i for p in parts for i in p.ids],
    )


__all__ = ["TaskSource", "concat_batches"]
