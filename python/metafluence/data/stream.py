"""Lazy task datasets: 10⁵ episodes that never sit in memory together.

``TaskDataset(dataset, split, num_tasks, ...)[i]`` draws task ``i`` on access from its own random
stream ``SeedSequence([seed, crc32(split), first_id + i])`` — the same task as
``sample_tasks(dataset, ..., seed=seed, split=split, first_id=first_id)[i]`` — and caches
nothing, so memory is the image pool plus whatever the caller keeps. Wrapped in a
:class:`metafluence.data.source.TaskSource` (or passed as ``train_tasks``), influence reads it
chunk by chunk (``MetaProblem.chunk_size`` tasks at a time).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch

from .._checks import check_int
from .dataset import FewShotDataset
from .sampling import EpisodeSpec
from .tasks import Task


class TaskDataset:
    """``num_tasks`` seeded ``ways``-way ``shots``-shot episodes of ``split``, drawn on access.

    Args:
        dataset: the image pool (:class:`FewShotDataset`).
        split: ``"train"``, ``"val"`` or ``"test"`` (any split the dataset has).
        num_tasks: ``M`` (``len``).
        ways, shots, queries: classes per task, support and query images per class.
        seed: task ``i`` depends only on ``(seed, split, first_id + i)``.
        dtype: floating dtype of the images (labels are int64).
        first_id: task ``i`` has id ``first_id + i`` (ids stay stable when ``M`` grows).

    ``ds[i]`` → :class:`Task` with support ``x [ways·shots, C, H, W]``, ``y [ways·shots]`` and
    query ``x [ways·queries, C, H, W]``, ``y [ways·queries]``; negative ``i`` counts from the end,
    ``i`` outside ``[-M, M)`` raises IndexError. Nothing is cached: each access draws again
    (the same tensors, fresh storage).
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        split: str = "train",
        num_tasks: int = 1000,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        first_id: int = 0,
    ) -> None:
        if not isinstance(dataset, FewShotDataset):
            raise TypeError(f"dataset must be a FewShotDataset, got {type(dataset).__name__}")
        self.num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
        self.first_id = check_int(first_id, "first_id", minimum=0)
        self._spec = spec = EpisodeSpec(dataset, ways, shots, queries, seed, split, dtype)
        self.dataset, self.split, self.dtype = spec.dataset, spec.split, spec.dtype
        self.ways, self.shots, self.queries, self.seed = (
            spec.ways,
            spec.shots,
            spec.queries,
            spec.seed,
        )

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, i: int) -> Task:
        if isinstance(i, bool):
            raise TypeError("TaskDataset index must be an integer, got bool")
        try:
            k = operator.index(i)
        except TypeError:
            raise TypeError(
                f"TaskDataset index must be an integer, got {type(i).__name__}"
            ) from None
        if not -self.num_tasks <= k < self.num_tasks:
            raise IndexError(f"task index {k} out of range for {self.num_tasks} tasks")
        if k < 0:
            k += self.num_tasks
        return self._spec.draw(self.first_id + k)

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(self.num_tasks))

    @property
    def ids(self) -> range:
        """Task ids ``first_id .. first_id + M - 1`` (known without drawing any task)."""
        return range(self.first_id, self.first_id + self.num_tasks)

    def __repr__(self) -> str:
        return (
            f"TaskDataset({self.dataset.name}:{self.split}, {self.num_tasks} tasks, "
            f"{self.ways}-way {self.shots}-shot {self.queries} queries, seed={self.seed})"
        )


__all__ = ["TaskDataset"]
