"""The engine contract: every inner map's engine is an ``Engine``; ``problem.engine`` is public."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

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


@pytest.mark.parametrize("inner", list(INNERS))
def test_value_and_grad_is_objective_and_meta_grad(inner: str) -> None:
    """One pass gives ``(F, ∇F)`` (weighted tasks, chunks of 2, streamed too)."""
    prob = _problem(inner, chunk_size=2)
    lam, tasks = prob.init_params(), _tasks()
    c = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    for src in (tasks, mf.TaskSource(tasks)):
        pt = prob.point(lam, prob.batch(src, prob.flat(lam), c) if src is tasks else src)
        f, g = pt.value_and_grad()
        assert_close_normwise(f, pt.objective(), rtol=1e-12)
        assert_close_normwise(g, pt.meta_grad(), rtol=1e-12)


@pytest.mark.parametrize("inner", list(INNERS))
def test_second_order_products_match_finite_differences(inner: str) -> None:
    """Every product of a point (solve operator, mixed blocks; reusing one linearisation on a
    stacked point) against central differences of the gradient blocks, float64: rows, a single
    vector, no rows, non-contiguous rows; a streamed point gives the same bits."""
    prob = _problem(inner, chunk_size=2)
    tasks = _tasks()
    lam = prob.flat(prob.init_params())
    pt = prob.point(lam, tasks)
    P, eps = prob.spec.size, 1e-5
    D = torch.randn(P, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).T

    def fd(d: Tensor) -> Tensor:
        up, dn = prob.point(lam + eps * d, tasks), prob.point(lam - eps * d, tasks)
        return (up.meta_grad() - dn.meta_grad()) / (2 * eps)

    want = torch.stack([fd(d) for d in D])
    op = pt.matvec("exact")
    assert_close_normwise(op(D), want, rtol=1e-7)
    assert_close_normwise(op(D[1]), want[1], rtol=1e-7)
    assert op(D[:0]).shape == (0, P)
    if inner != "implicit":  # the stacked point keeps one linearisation per engine
        assert all(e._lin is not None for e in pt.engines)
    # the mixed blocks (scores): central differences of the per-item gradient blocks
    s = D[0].contiguous()
    got = pt.item_scores(s)
    up, dn = (
        prob.point(lam + eps * s, tasks).grad_all(),
        prob.point(lam - eps * s, tasks).grad_all(),
    )
    c, W, V = pt.batch.weights()
    for g, u, d, w in zip(got, up[1:], dn[1:], (c, W, V), strict=True):
        assert_close_normwise(g, w * (u - d) / (2 * eps), rtol=1e-7)
    st = prob.point(lam, mf.TaskSource(tasks))
    assert torch.equal(st.matvec("exact")(D), op(D))
    assert all(torch.equal(a, b) for a, b in zip(st.item_scores(s), got, strict=True))


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


@pytest.mark.parametrize("inner", list(INNERS))
def test_removal_rhs_of_tasks_is_their_gradient(inner: str) -> None:
    """Removing whole tasks: ``Σ_{k∈R} c_k g_k`` (one gradient pass over the removed tasks);
    with points as well, the mixed product's λ-block; chunks of 2, streamed the same."""
    prob = _problem(inner, chunk_size=2)
    lam, tasks = prob.flat(prob.init_params()), _tasks()
    c = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.25], dtype=torch.float64)
    pt = prob.point(lam, prob.batch(tasks, lam, c))
    G = pt.task_grads()
    want = c[0] * G[0] + c[3] * G[3] + c[4] * G[4]
    assert_close_normwise(pt.removal_rhs({"task": [4, 0, 3, 3]}), want, rtol=1e-12)
    mixed = {"task": [1], "support_point": [(2, 1)]}
    cw, W, V = pt.batch.weights()
    dc, dW = torch.zeros_like(cw), torch.zeros_like(W)
    dc[1], dW[2, 1] = cw[1], W[2, 1]
    full = prob.engine(lam, pt.batch).hvp_all(torch.zeros_like(lam), dc, dW, torch.zeros_like(V))
    assert_close_normwise(pt.removal_rhs(mixed), full[0], rtol=1e-10)
    st = prob.point(lam, mf.TaskSource(tasks), c)
    assert_close_normwise(st.removal_rhs({"task": [0, 3, 4]}), want, rtol=1e-12)


def test_kept_linearisations_stay_within_the_memory_budget(monkeypatch) -> None:
    """A point keeps its engines' linearisations within one budget (a share of the device's
    memory, measured around each build); with no budget each product builds its own graph,
    chunk by chunk, and the values are the same bits."""
    from metafluence.bilevel._budget import LinearisationBudget, memory_in_use, memory_total

    prob = _problem("unrolled", chunk_size=2)
    lam, tasks = prob.flat(prob.init_params()), _tasks()
    D = torch.randn(2, prob.spec.size, dtype=torch.float64)
    kept = prob.point(lam, tasks)
    want = kept.hvp(D)
    assert all(e._lin is not None for e in kept.engines)  # a tiny graph: within the budget
    monkeypatch.setattr(mf.bilevel.point.BilevelPoint, "LINEARISE_FRACTION", 0.0)
    none = prob.point(lam, tasks)
    assert torch.equal(none.hvp(D), want)
    assert all(e._lin is None for e in none.engines)
    b = LinearisationBudget(100)
    assert b.take(60) and not b.take(50) and b.take(40) and not b.take(1) and b.left == 0
    assert not LinearisationBudget(10).take(None)  # unmeasurable: not kept
    cpu = torch.device("cpu")
    if memory_in_use(cpu) is not None and memory_total(cpu) is not None:  # Linux: RSS, RAM
        assert LinearisationBudget.share(cpu, 0.25).left == int(0.25 * memory_total(cpu))
    else:  # memory that cannot be measured is never spent
        assert LinearisationBudget.share(cpu, 0.25).left == 0
