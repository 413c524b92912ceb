"""N-way K-shot episode sampling and label-noise injection.

Task ``i`` of ``sample_tasks(..., seed=s)`` is drawn from its own random stream
``SeedSequence([s, split, i])``: it is the same task whatever ``num_tasks`` is, so task ids stay
stable when a run is enlarged.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._checks import check_float, check_int
from .dataset import FewShotDataset
from .tasks import Task

LEVELS = ("task", "point")
WHERE = ("support", "query")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(k) for k in keys]]))


class EpisodeSpec:
    """Validated ``ways``-way ``shots``-shot episode settings over one split of a dataset.

    Holds the split's per-class sample pools and the eligible classes (those with at least
    ``shots + queries`` images); :meth:`draw` builds task ``i`` from its own random stream
    ``SeedSequence([seed, crc32(split), i])``, so a task depends only on ``(seed, split, i)``.
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int,
        split: str,
        dtype: torch.dtype,
    ) -> None:
        self.ways = check_int(ways, "ways", minimum=2)
        self.shots = check_int(shots, "shots", minimum=1)
        self.queries = check_int(queries, "queries", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dataset, self.split, self.dtype = dataset, split, dtype
        self.pools = dataset.by_class(split)
        need = self.shots + self.queries
        self.eligible = np.array(
            sorted(c for c, idx in self.pools.items() if len(idx) >= need), dtype=np.int64
        )
        if len(self.eligible) < self.ways:
            raise ValueError(
                f"{dataset.name} split {split!r} has {len(self.eligible)} classes with at least "
                f"{need} images (shots + queries); a {self.ways}-way task needs {self.ways}"
            )
        self.split_key = zlib.crc32(split.encode())
        # labels are the same for every task: built once, shared read-only (never written to)
        self.ys = torch.arange(self.ways).repeat_interleave(self.shots)
        self.yq = torch.arange(self.ways).repeat_interleave(self.queries)

    def draw(self, i: int) -> Task:
        """Task ``i`` (id ``i``): ``x_s [ways·shots, C, H, W]``, ``x_q [ways·queries, C, H, W]``."""
        rng = _rng(self.seed, self.split_key, i)
        need = self.shots + self.queries
        classes = rng.choice(self.eligible, size=self.ways, replace=False)
        picks = np.stack(
            [rng.choice(self.pools[int(c)], size=need, replace=False) for c in classes]
        )
        s_idx = picks[:, : self.shots].reshape(-1)
        q_idx = picks[:, self.shots :].reshape(-1)
        x = self.dataset.tensor(np.concatenate([s_idx, q_idx]), self.dtype)
        meta = {
            "split": self.split,
            "classes": classes.tolist(),
            "class_names": [self.dataset.class_names[int(c)] for c in classes],
            "support_index": s_idx.tolist(),
            "query_index": q_idx.tolist(),
        }
        return Task(
            support=(x[: len(s_idx)], self.ys.clone()),
            query=(x[len(s_idx) :], self.yq.clone()),
            id=i,
            meta=meta,
        )


def sample_tasks(
    dataset: FewShotDataset,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    num_tasks: int = 200,
    seed: int = 0,
    split: str = "train",
    dtype: torch.dtype = torch.float32,
    first_id: int = 0,
) -> list[Task]:
    """``num_tasks`` seeded ``ways``-way ``shots``-shot tasks with ``queries`` queries per class.

    Each task draws ``ways`` distinct classes of ``split`` and ``shots + queries`` distinct
    images of each; labels are relabelled ``0..ways-1`` in the drawn class order. Support
    ``x [ways·shots, C, H, W]``, query ``x [ways·queries, C, H, W]`` (class-major), float in [0, 1].
    Task ids are ``first_id + i``; ``task.meta`` records the split, the class indices and names,
    and the sample indices. For 10⁵ tasks that should not sit in memory at once use
    :class:`metafluence.data.TaskDataset` (the same tasks, drawn on access).
    """
    spec = EpisodeSpec(dataset, ways, shots, queries, seed, split, dtype)
    num_tasks = check_int(num_tasks, "num_tasks", minimum=1)
    first_id = check_int(first_id, "first_id", minimum=0)
    return [spec.draw(first_id + i) for i in range(num_tasks)]


def _derangement(ways: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        p = rng.permutation(ways)
        if not np.any(p == np.arange(ways)):
            return p


def flip_labels(
    tasks: Sequence[Task],
    fraction: float = 0.2,
    level: str = "task",
    seed: int = 0,
    where: str = "support",
    ways: int | None = None,
) -> tuple[list[Task], Tensor | list[Tensor]]:
    """Inject label noise; returns ``(new tasks, ground-truth mask)``.

    - ``level="task"``: ``round(fraction·M)`` tasks (seeded choice) get their ``where`` labels
      permuted by a derangement of the classes (every label wrong, the other set untouched), so
      adapting on them teaches the wrong mapping: harmful tasks. Mask: bool ``[M]``.
    - ``level="point"``: in every task, each ``where`` point is flipped with probability
      ``fraction`` to a different random class. Mask: list of ``M`` bool tensors ``[n]``/``[m]``.

    Task ids, data and weights are kept; ``task.meta["flipped"]`` records what changed.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r}: expected one of {LEVELS}")
    if where not in WHERE:
        raise ValueError(f"where={where!r}: expected one of {WHERE}")
    check_float(fraction, "fraction", minimum=0.0, maximum=1.0)
    seed = check_int(seed, "seed", minimum=0)
    tasks = list(tasks)
    M = len(tasks)
    rng = _rng(seed, 0x5EED, LEVELS.index(level))

    def n_ways(t: Task) -> int:
        if ways is not None:
            return int(ways)
        return int(max(int(t.support[1].max()), int(t.query[1].max()))) + 1

    def rebuild(t: Task, y_new: Tensor, flipped: object) -> Task:
        sup, qry = t.support, t.query
        if where == "support":
            sup = (sup[0], y_new)
        else:
            qry = (qry[0], y_new)
        meta = dict(t.meta)
        meta["flipped"] = flipped
        return Task(
            sup,
            qry,
            id=t.id,
            support_weight=t.support_weight,
            query_weight=t.query_weight,
            meta=meta,
        )

    out: list[Task] = []
    if level == "task":
        k = int(round(float(fraction) * M))
        chosen = set(rng.choice(M, size=k, replace=False).tolist()) if k else set()
        mask = torch.zeros(M, dtype=torch.bool)
        for i, t in enumerate(tasks):
            if i not in chosen:
                out.append(t)
                continue
            y = t.support[1] if where == "support" else t.query[1]
            perm = torch.as_tensor(_derangement(n_ways(t), rng), dtype=y.dtype)
            out.append(rebuild(t, perm[y], True))
            mask[i] = True
        return out, mask
    masks: list[Tensor] = []
    for t in tasks:
        y = t.support[1] if where == "support" else t.query[1]
        w = n_ways(t)
        flip = torch.from_numpy(rng.random(len(y)) < float(fraction))
        shift = torch.from_numpy(rng.integers(1, w, size=len(y))).to(y.dtype)
        y_new = torch.where(flip, (y + shift) % w, y)
        out.append(rebuild(t, y_new, flip.clone()) if bool(flip.any()) else t)
        masks.append(flip)
    return out, masks
