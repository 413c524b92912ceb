"""The scores' mixed product read off the solve's own products (:mod:`metafluence.bilevel._tape`).

Against the mixed product itself: float64 to 1e-10, float32 norm-wise; stacked, streamed and
weighted points; several right-hand sides; what the tape must refuse (a vector outside the span,
a full tape, an engine without item blocks) falls back to the mixed product.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import metafluence as mf
from metafluence.bilevel._tape import ProductTape, span_coefficients
from metafluence.bilevel.point import BilevelPoint
from tests._close import assert_close_normwise
from tests.bilevel.test_engine import _problem, _tasks
from tests.resume_worker import Dataset


def _solve_recorded(pt: BilevelPoint, b: torch.Tensor, maxiter: int = 4):
    curv = mf.Curvature("exact", "krylov", "cg", 0.5, {"maxiter": maxiter, "rtol": 1e-12})
    with pt.recording() as tape, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few iterations: unconverged on purpose
        res = curv.solve(pt, b)
    return res.x, tape


def _direct(pt: BilevelPoint, s: torch.Tensor):
    return pt.item_scores(s)  # no tape: the mixed product


@pytest.mark.parametrize("inner", ["unrolled", "head_only"])
@pytest.mark.parametrize("streamed", [False, True])
def test_item_blocks_off_the_solve_equal_the_mixed_product(inner, streamed):
    prob = _problem(inner, chunk_size=2)
    lam = prob.flat(prob.init_params())
    tasks = _tasks(5)
    pt = prob.point(lam, Dataset(tasks) if streamed else prob.batch(tasks, lam))
    b = torch.randn(lam.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s, tape = _solve_recorded(pt, b)
    # one direction per CG iteration, and x itself for the unconverged solve's true residual
    assert tape.valid and len(tape.rows) == 5
    got = pt.item_scores(s, tape)
    want = _direct(pt, s)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_close_normwise(g, w, rtol=1e-10)


def test_weighted_points_float32_and_no_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=2, lr=0.3), damping=0.01)
    tasks = [
        mf.Task((t.support[0].float(), t.support[1]), (t.query[0].float(), t.query[1]), id=t.id)
        for t in _tasks(7)
    ]
    lam = prob.flat(prob.init_params())
    weights = torch.linspace(0.5, 1.5, 7)
    pt = prob.point(lam, prob.batch(tasks, lam, task_weight=weights))
    b = torch.randn(lam.numel(), generator=torch.Generator().manual_seed(2))
    s, tape = _solve_recorded(pt, b, maxiter=3)
    calls = []
    original = BilevelPoint.chunk_item_scores

    def counted(engine, v):
        calls.append(1)
        return original(engine, v)

    BilevelPoint.chunk_item_scores = staticmethod(counted)  # type: ignore[method-assign]
    try:
        got = pt.item_scores(s, tape)
    finally:
        BilevelPoint.chunk_item_scores = staticmethod(original)  # type: ignore[method-assign]
    assert calls == []  # no mixed product: read off the tape
    want = _direct(pt, s)
    for g, w in zip(got, want, strict=True):
        assert_close_normwise(g, w, rtol=1e-5)


def test_several_right_hand_sides_and_removal_effects_targets():
    prob = _problem("unrolled", chunk_size=2)
    lam = prob.init_params()
    tasks, targets = _tasks(5), [_tasks(2, seed=s) for s in (3, 4)]
    curv = mf.Curvature("exact", "krylov", "cg", 0.5, {"maxiter": 50, "rtol": 1e-12})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        many = mf.removal_effects(prob, lam, tasks, targets=targets, curvature=curv)
        for j, t in enumerate(targets):
            one = mf.removal_effects(prob, lam, tasks, target=t, curvature=curv)
            pt = prob.point(prob.flat(lam), tasks)
            want = _direct(pt, one.solve.x)
            assert_close_normwise(one.all_scores["task"], want[0], rtol=1e-10)
            assert_close_normwise(many.all_scores["task"][:, j], want[0], rtol=1e-8)
            q = torch.stack(many.all_scores["query_point"])[..., j]
            assert_close_normwise(q, want[2], rtol=1e-8)


def test_what_the_tape_refuses_falls_back_to_the_mixed_product():
    prob = _problem("unrolled", chunk_size=2)
    lam = prob.flat(prob.init_params())
    pt = prob.point(lam, prob.batch(_tasks(5), lam))
    P = lam.numel()
    g = torch.Generator().manual_seed(3)
    s, tape = _solve_recorded(pt, torch.randn(P, dtype=torch.float64, generator=g), maxiter=2)
    other = torch.randn(P, dtype=torch.float64, generator=g)  # not in the span of 2 directions
    assert tape.coefficients(other) is None
    for a, b in zip(pt.item_scores(other, tape), _direct(pt, other), strict=True):
        assert torch.equal(a, b)
    zero = tape.coefficients(torch.zeros(P, dtype=torch.float64))
    assert zero is not None and not zero.any()
    assert ProductTape().coefficients(s) is None  # nothing recorded
    with pt.recording() as full:
        full.max_bytes = 8  # less than one direction: the tape gives up
        pt.hvp(s)
    assert not full.valid and full.rows == [] and full.coefficients(s) is None
    # an implicit map's engine gives no item blocks with its products: the tape says so
    iprob = _problem("implicit", chunk_size=2)
    ilam = iprob.flat(iprob.init_params())
    ipt = iprob.point(ilam, iprob.batch(_tasks(5), ilam))
    s_i, t_i = _solve_recorded(ipt, torch.randn(P, dtype=torch.float64, generator=g), maxiter=2)
    assert not t_i.valid and t_i.coefficients(s_i) is None


def test_span_coefficients_is_exact_on_dependent_rows_and_reproducible():
    g = torch.Generator().manual_seed(0)
    for dt, tol in ((torch.float64, 1e-13), (torch.float32, 1e-5)):
        D = torch.randn(6, 300, dtype=dt, generator=g)
        D = torch.cat([D, 3 * D[:2], D[3:4]])  # dependent rows get a = 0
        a0 = torch.randn(9, dtype=dt, generator=g)
        a0[6:] = 0
        s = a0 @ D
        a = span_coefficients(D, s)
        assert float((a @ D - s).norm() / s.norm()) < tol
        assert torch.equal(a[6:], torch.zeros(3, dtype=dt))
        assert all(torch.equal(a, span_coefficients(D.clone(), s.clone())) for _ in range(5))
    assert span_coefficients(torch.zeros(0, 4), torch.ones(4)).shape == (0,)


def test_the_gradient_comes_with_the_linearisation():
    prob = _problem("unrolled", chunk_size=2)
    lam = prob.flat(prob.init_params())
    fresh = prob.point(lam, prob.batch(_tasks(5), lam))
    want = fresh.grad_all()
    pt = prob.point(lam, prob.batch(_tasks(5), lam))
    pt.hvp(torch.ones_like(lam))  # builds (and keeps) each chunk's linearisation
    for e in pt.engines:
        assert e._grad is not None
    for a, b in zip(pt.grad_all(), want, strict=True):
        assert_close_normwise(a, b, rtol=1e-12)


def test_the_basis_is_made_once_and_again_after_a_new_product():
    prob = _problem("unrolled", chunk_size=2)
    lam = prob.flat(prob.init_params())
    pt = prob.point(lam, prob.batch(_tasks(5), lam))
    g = torch.Generator().manual_seed(4)
    s, tape = _solve_recorded(pt, torch.randn(lam.numel(), dtype=torch.float64, generator=g), 2)
    assert tape.coefficients(s) is not None
    basis = tape._basis
    assert tape.coefficients(2 * s) is not None and tape._basis is basis  # reused
    new = torch.randn(lam.numel(), dtype=torch.float64, generator=g)
    assert tape.coefficients(new) is None
    pt._tape = tape  # record one more product on the same tape
    pt.hvp(new)
    pt._tape = None
    a = tape.coefficients(new)  # the new direction is in the span now
    assert a is not None and tape._basis is not basis
    assert_close_normwise(a @ torch.cat(tape.rows), new, rtol=1e-12)
