"""The engine contract: every inner map's engine is an ``Engine``; ``problem.engine`` is public."""

from __future__ import annotations

import pytest
import torch

import metafluence as mf
from metafluence.bilevel.engine import ENGINES, Engine, build_engine
from metafluence.bilevel.reduce import LocalReduce, Reduction
from tests._close import assert_close_normwise


def _tasks(M: int = 5, seed: int = 0) -> list[mf.Task]:
    g = torch.Generator().manual_seed(seed)
    return [
        mf.Task(
            (
                torch.randn(4, 3, generator=g, dtype=torch.float64),
                torch.randint(0, 2, (4,), generator=g),
            ),
            (
                torch.randn(6, 3, generator=g, dtype=torch.float64),
                torch.randint(0, 2, (6,), generator=g),
            ),
            id=i,
        )
        for i in range(M)
    ]


INNERS = {
    "unrolled": lambda: mf.inner.Unrolled(steps=2, lr=0.3),
    "head_only": lambda: mf.inner.HeadOnly("2", steps=2, lr=0.3),
    "implicit": lambda: mf.inner.Implicit(reg=10.0),
}


def _problem(inner: str, **kw) -> mf.MetaProblem:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return mf.MetaProblem(model.double(), inner=INNERS[inner](), damping=0.01, **kw)


@pytest.mark.parametrize("inner", list(INNERS))
def test_every_engine_keeps_the_contract(inner: str) -> None:
    prob = _problem(inner, chunk_size=2)
    lam, tasks = prob.init_params(), _tasks()
    eng = prob.engine(lam, tasks)
    assert isinstance(eng, Engine)
    M, P = 5, prob.spec.size
    assert eng.task_losses().shape == (M,)
    assert eng.task_grads().shape == (M, P)
    assert eng.adapted().shape == (M, P)
    D = torch.randn(3, P, dtype=torch.float64)
    assert eng.hvp_exact(D).shape == (3, P)
    # one engine over all tasks = the point's sum over its chunks of 2 (the one chunker)
    pt = prob.point(lam, tasks)
    assert len(pt.engines) == 3
    c = eng.batch.task_weight
    g = (c[:, None] * eng.task_grads()).sum(0) + prob.damping * prob.flat(lam)
    assert_close_normwise(g, pt.meta_grad(), rtol=1e-10)
    assert_close_normwise(eng.hvp_exact(D) + prob.damping * D, pt.hvp(D, "exact"), rtol=1e-10)


def test_streamed_tasks_give_the_same_engine() -> None:
    prob = _problem("unrolled")
    lam, tasks = prob.init_params(), _tasks()
    a = prob.engine(lam, tasks).task_losses()
    b = prob.engine(lam, mf.TaskSource(tasks)).task_losses()
    assert torch.equal(a, b)


def test_engine_arguments_are_checked() -> None:
    prob = _problem("unrolled")
    with pytest.raises(ValueError, match="meta_params vector has shape"):
        prob.engine(torch.zeros(3, dtype=torch.float64), _tasks())
    with pytest.raises(TypeError, match="tasks must be"):
        prob.engine(prob.init_params(), "tasks")
    with pytest.raises(TypeError, match="no engine for inner map"):
        build_engine(prob.fm, object(), None, prob.flat(prob.init_params()))  # type: ignore[arg-type]
    assert set(ENGINES) == {mf.inner.Unrolled, mf.inner.Implicit}


def test_reduction_is_passed_in_not_subclassed() -> None:
    assert isinstance(LocalReduce(), Reduction)
    with pytest.raises(TypeError, match="reduce must be a Reduction"):
        _problem("unrolled", reduce=object())
    prob = _problem("unrolled", chunk_size=3)
    again = prob.with_reduce(LocalReduce())
    assert again is not prob and again.fm is not prob.fm
    assert (again.model, again.inner, again.damping, again.chunk_size) == (
        prob.model,
        prob.inner,
        prob.damping,
        prob.chunk_size,
    )
    lam, tasks = prob.init_params(), _tasks()
    assert torch.equal(again.meta_grad(lam, tasks), prob.meta_grad(lam, tasks))
