"""Lazy task datasets (``mf.data.TaskDataset``) and streamed influence over them."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

import metafluence as mf
from metafluence.data import TaskDataset
from metafluence.data.source import TaskSource
from metafluence.models import MLP
from tests.data.test_sampling import _toy


def same(a: mf.Task, b: mf.Task) -> bool:
    return (
        a.id == b.id
        and a.meta == b.meta
        and all(torch.equal(u, v) for u, v in zip(a.support, b.support, strict=True))
        and all(torch.equal(u, v) for u, v in zip(a.query, b.query, strict=True))
    )


KW = dict(ways=3, shots=2, queries=3, seed=4)


def test_task_dataset_equals_sample_tasks():
    ds = _toy()
    for split, first_id in (("train", 0), ("val", 7)):
        kw = dict(KW, ways=2) if split == "val" else KW
        lazy = TaskDataset(ds, split, num_tasks=9, first_id=first_id, **kw)
        ref = mf.data.sample_tasks(ds, num_tasks=9, split=split, first_id=first_id, **kw)
        assert len(lazy) == 9 and list(lazy.ids) == [t.id for t in ref]
        assert all(same(lazy[i], r) for i, r in enumerate(ref))
        assert all(same(t, r) for t, r in zip(lazy, ref, strict=True))  # __iter__
        assert same(lazy[-1], ref[-1]) and same(lazy[-9], ref[0])
    # dtype is honoured; another seed gives other tasks
    t64 = TaskDataset(ds, num_tasks=3, dtype=torch.float64, **KW)[1]
    assert t64.support[0].dtype == torch.float64 and t64.support[1].dtype == torch.int64
    other = TaskDataset(ds, num_tasks=5, **dict(KW, seed=5))
    ref = TaskDataset(ds, num_tasks=5, **KW)
    assert any(not torch.equal(other[i].support[0], ref[i].support[0]) for i in range(5))


def test_task_dataset_deterministic_stable_and_uncached():
    ds = _toy()
    a = TaskDataset(ds, num_tasks=20, **KW)
    b = TaskDataset(ds, num_tasks=1000, **KW)  # ids stay stable when M grows
    t1, t2 = a[13], a[13]
    assert same(t1, t2) and same(t1, b[13])
    assert t1.support[0].data_ptr() != t2.support[0].data_ptr()  # drawn again, not cached
    t1.support[1][0] = 2  # an in-place edit of one draw does not leak into the next
    assert a[13].support[1][0] == 0
    shifted = TaskDataset(ds, num_tasks=5, first_id=13, **KW)
    assert same(shifted[0], a[13]) and shifted[0].id == 13
    assert t2.support[0].shape == (6, 1, 5, 5) and t2.query[0].shape == (9, 1, 5, 5)
    assert t2.support[1].tolist() == [0, 0, 1, 1, 2, 2]
    assert "3-way 2-shot" in repr(a)


def test_task_dataset_errors_name_the_argument():
    ds = _toy()
    a = TaskDataset(ds, num_tasks=4, **KW)
    for bad in (4, -5, 10**9):
        with pytest.raises(IndexError, match=f"task index {bad} out of range for 4 tasks"):
            a[bad]
    for bad in (1.0, "1", True, None):
        with pytest.raises(TypeError, match="index must be an integer"):
            a[bad]
    assert same(a[np.int64(2)], a[2])
    with pytest.raises(ValueError, match="num_tasks"):
        TaskDataset(ds, num_tasks=0, **KW)
    with pytest.raises(ValueError, match="first_id"):
        TaskDataset(ds, num_tasks=3, first_id=-1, **KW)
    with pytest.raises(ValueError, match="ways"):
        TaskDataset(ds, num_tasks=3, **dict(KW, ways=1))
    with pytest.raises(ValueError, match="classes with at least"):
        TaskDataset(ds, "val", num_tasks=3, **dict(KW, ways=5))
    with pytest.raises(ValueError, match="split='nope'"):
        TaskDataset(ds, "nope", num_tasks=3, **KW)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        TaskDataset(ds, num_tasks=3, dtype=torch.int64, **KW)
    with pytest.raises(TypeError, match="FewShotDataset"):
        TaskDataset([1, 2, 3], num_tasks=3)  # type: ignore[arg-type]


class Watched:
    """A dataset wrapper recording the read order and how many drawn tasks are alive at once."""

    def __init__(self, ds: TaskDataset) -> None:
        self.ds, self.order, self.live, self.max_live = ds, [], 0, 0

    def __len__(self) -> int:
        return len(self.ds)

    def _dead(self) -> None:
        self.live -= 1

    def __getitem__(self, i: int) -> mf.Task:
        t = self.ds[i]
        self.order.append(i)
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        weakref.finalize(t.support[0], self._dead)  # alive while the drawn images are
        return t


def test_streamed_scores_read_chunks_and_match_stacked():
    ds = _toy(classes=20, per=8, size=6)
    M, chunk = 2000, 400
    watched = Watched(TaskDataset(ds, num_tasks=M, ways=3, shots=1, queries=2, seed=1))
    target = mf.data.sample_tasks(ds, ways=3, shots=1, queries=2, num_tasks=4, split="val")
    torch.manual_seed(0)
    prob = mf.MetaProblem(
        MLP(36, ways=3, hidden=(8,)).double(),
        inner=mf.inner.HeadOnly(head="head", steps=1, lr=0.5),
        chunk_size=chunk,
    )
    lam = prob.init_params()
    kw = dict(target=target, curvature="gauss_newton", solver="cg", diagnostics=False)
    kw.update(solver_kwargs={"maxiter": 2, "rtol": 0.0}, solve_damping=0.1)
    src = TaskSource(watched)
    assert watched.max_live <= 2  # the validating pass keeps no task
    with pytest.warns(RuntimeWarning, match="did not converge"):
        out = mf.removal_effects(prob, lam, src, **kw)
    # every pass reads the tasks in order, chunk by chunk; at most two chunks of drawn tasks are
    # alive at once (the next chunk is read while the previous one is still referenced)
    passes = len(watched.order) // M
    assert passes >= 3 and len(watched.order) == passes * M
    assert watched.order == list(range(M)) * passes
    assert chunk <= watched.max_live <= 2 * chunk, watched.max_live
    assert out.task_ids == list(range(M))
    # the same numbers as the stacked list (the first 2000 tasks held in memory)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        ref = mf.removal_effects(prob, lam, [watched.ds[i] for i in range(M)], **kw)
    s, r = out.all_scores["task"], ref.all_scores["task"]
    assert s.shape == (M,) and bool(torch.isfinite(s).all()) and float(r.abs().max()) > 0
    assert torch.allclose(s, r, rtol=1e-9, atol=1e-12 * float(r.abs().max()))
