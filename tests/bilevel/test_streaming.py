"""Streamed task sources give the same numbers as stacked batches (float64, rel 1e-12)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafluence as mf
from metafluence.data.source import TaskSource


def y(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g)


class LazyTasks:
    """A dataset that builds task ``i`` on access (nothing stacked in memory)."""

    def __init__(self, M: int, seed: int = 0, n: int = 4, m: int = 6):
        self.M, self.seed, self.n, self.m = M, seed, n, m
        self.reads = 0

    def __len__(self) -> int:
        return self.M

    def __getitem__(self, i: int) -> mf.Task:
        if not 0 <= i < self.M:
            raise IndexError(i)
        self.reads += 1
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        return mf.Task(
            support=(torch.randn(self.n, 3, generator=g), y(self.n, g)),
            query=(torch.randn(self.m, 3, generator=g), y(self.m, g)),
            id=f"t{i}",
        )


class Reiterable:
    def __init__(self, ds: LazyTasks):
        self.ds = ds

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))


def problem(inner, chunk_size=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return mf.MetaProblem(model, inner=inner, damping=1e-2, chunk_size=chunk_size)


INNERS = {
    "unrolled": lambda: mf.inner.Unrolled(steps=2, lr=0.3),
    "implicit": lambda: mf.inner.Implicit(reg=2.0, steps=5, lr=0.2, newton_steps=8),
    "head_only": lambda: mf.inner.HeadOnly(head="2", steps=1, lr=0.5),
}


def close(a, b, rtol=1e-12):
    return torch.allclose(a, b, rtol=rtol, atol=1e-14 * float(b.abs().max() + 1))


@pytest.mark.parametrize("kind", sorted(INNERS))
def test_removal_effects_streamed_equal_stacked(kind):
    ds = LazyTasks(11)
    tasks = [ds[i] for i in range(len(ds))]
    target = [LazyTasks(3, seed=7)[i] for i in range(3)]
    prob = problem(INNERS[kind]())
    lam = prob.init_params()
    kw = dict(target=target, solver="direct", solve_damping=0.1, diagnostics=False)
    ref = mf.removal_effects(prob, lam, tasks, **kw)
    for src in (ds, Reiterable(ds), TaskSource(ds)):
        out = mf.removal_effects(prob, lam, src, **kw)
        assert out.task_ids == ref.task_ids
        assert close(out.all_scores["task"], ref.all_scores["task"])
        for key in ("support_point", "query_point"):
            assert close(torch.stack(out.all_scores[key]), torch.stack(ref.all_scores[key]))
    remove = {"task": [1, 8], "support_point": [(3, 2)]}
    d_ref = mf.param_influence(prob, lam, tasks, remove, solver="direct")
    d_src = mf.param_influence(prob, lam, ds, remove, solver="direct")
    for k in d_ref:
        assert close(d_src[k], d_ref[k], rtol=1e-10)


def test_streamed_point_reads_chunks_not_everything():
    ds = LazyTasks(10)
    prob = problem(INNERS["unrolled"](), chunk_size=4)
    lam = prob.flat(prob.init_params())
    src = TaskSource(ds)  # validation pass: reads each task once
    assert ds.reads == 10
    pt = prob.point(lam, src)
    with pytest.raises(TypeError, match="streams its tasks"):
        _ = pt.batch
    g = pt.meta_grad()
    assert ds.reads == 20  # one more pass, chunk by chunk
    ref = prob.point(lam, [ds[i] for i in range(10)]).meta_grad()
    assert close(g, ref)
    assert len(pt.ids) == 10 and pt.ids[3] == "t3"


def test_meta_train_streamed_equals_stacked():
    ds = LazyTasks(9)
    tasks = [ds[i] for i in range(9)]
    prob = problem(INNERS["unrolled"]())
    for bs in (None, 4):
        a = mf.train.meta_train(prob, None, tasks, steps=5, outer_lr=0.05, batch_size=bs, seed=2)
        b = mf.train.meta_train(prob, None, ds, steps=5, outer_lr=0.05, batch_size=bs, seed=2)
        for k in a:
            assert close(b[k], a[k])


def test_edit_streamed_equals_stacked():
    ds = LazyTasks(8)
    tasks = [ds[i] for i in range(8)]
    prob = problem(INNERS["unrolled"]())
    lam = prob.init_params()
    kw = dict(solver="direct", solve_damping=0.5, newton_steps=1)
    a = mf.edit(prob, lam, tasks, {"task": [2]}, **kw)
    b = mf.edit(prob, lam, ds, {"task": [2]}, **kw)
    for k in a:
        assert close(b[k], a[k], rtol=1e-9)


def test_source_errors_name_the_problem():
    ds = LazyTasks(4)
    with pytest.raises(TypeError, match="one-shot iterator"):
        TaskSource(ds[i] for i in range(4))
    with pytest.raises(ValueError, match="empty"):
        TaskSource(LazyTasks(0))
    dup = [ds[0], ds[1], ds[0]]
    with pytest.raises(ValueError, match="duplicate task id 't0'"):
        TaskSource(Reiterable_list(dup))
    with pytest.raises(TypeError, match="item 1 is int"):
        TaskSource(Reiterable_list([ds[0], 3]))
    odd = mf.Task(
        support=(torch.randn(5, 3), torch.zeros(5, dtype=torch.long)), query=ds[1].query, id="odd"
    )
    with pytest.raises(ValueError, match="task 'odd'"):
        TaskSource(Reiterable_list([ds[0], odd]))
    src = TaskSource(ds)
    with pytest.raises(ValueError, match="outside"):
        src.reweighted({"task": [4]})
    with pytest.raises(ValueError, match="task_weight has shape"):
        src.with_task_weight(torch.ones(3))
    with pytest.raises(TypeError, match="len \\+ __getitem__"):
        TaskSource(Reiterable(ds)).select([0])
    bad = LazyTasks(3)
    prob = problem(INNERS["unrolled"]())
    orig = bad.__class__.__getitem__

    class BadLabels(LazyTasks):
        def __getitem__(self, i):
            t = orig(self, i)
            return mf.Task(support=t.support, query=(t.query[0], t.query[1] + 5), id=t.id)

    pt = prob.point(prob.init_params(), BadLabels(3))
    with pytest.raises(ValueError, match="task 't0': query y has label"):
        pt.meta_grad()


class Reiterable_list:  # noqa: N801 - a list that is not a list (exercises the lazy path)
    def __init__(self, xs):
        self.xs = xs

    def __iter__(self):
        return iter(self.xs)
