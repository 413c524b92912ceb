"""Property: random bad values, types and shapes in every argument of the public entries
(``removal_effects``, ``param_influence``, ``edit``, ``fit_curvature``, ``meta_train``,
``per_sample_grads``) give a ``ValueError`` / ``TypeError`` (``KeyError`` for a missing
parameter name) naming the argument, or valid, finite results: never NaN, never an exception
from inside torch.

A value that is bad by its kind alone (a bool or a float for an int, a string for a float,
NaN/Inf, out of range) must raise; the others may run and must then give finite results.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import metafluence as mf
from tests.bilevel.test_validation import mk

from ._strategies import FAST

ERRORS = (ValueError, TypeError, KeyError)
NAN, INF = float("nan"), float("inf")


def _problem(damping: float = 0.0, chunk_size: int | None = None) -> mf.MetaProblem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    inner = mf.inner.Unrolled(steps=1, lr=0.1)
    return mf.MetaProblem(model, inner=inner, damping=damping, chunk_size=chunk_size)


PROB = _problem()
TASKS = [mk(0), mk(1), mk(2)]
TARGET = [mk(5)]


def _finite(out: Any) -> bool:
    """Every tensor (and float) in ``out`` is finite."""
    if isinstance(out, torch.Tensor):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if isinstance(out, float):
        return math.isfinite(out)
    if isinstance(out, dict):
        return all(_finite(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return all(_finite(v) for v in out)
    if isinstance(out, mf.InfluenceResult):
        return _finite([out.scores, out.all_scores, out.solve.x])
    if isinstance(out, mf.Curvature):
        return _finite([out.eigvals, out.eigvecs]) if out.eigvals is not None else True
    return True


def _check(call: Callable[[], Any], names: tuple[str, ...], must_fail: bool) -> None:
    """``call()`` raises an error naming one of ``names`` or returns finite results (and it
    must raise when ``must_fail``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call()
    except ERRORS as e:
        msg = str(e)
        assert any(n in msg for n in names), f"{type(e).__name__} names none of {names}: {msg}"
        return
    assert not must_fail, "a value bad by its kind alone was accepted"
    assert _finite(out), "non-finite results"


# ---- numeric arguments ------------------------------------------------------------------------

ANY_NUMBER = st.one_of(
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.integers(-3, 3),
    st.sampled_from([NAN, INF, -INF, 2.5, -0.5, 0.0, 1e-3, 1e31, 1e308, 1.0]),
    st.floats(0.0, 3.0),
)


def _bad_int(v: Any, minimum: int, optional: bool = False) -> bool:
    if v is None:
        return not optional
    return isinstance(v, bool) or not isinstance(v, int) or v < minimum


def _bad_float(v: Any, minimum: float = 0.0, maximum: float = 1e30, positive: bool = False) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return True
    return not (minimum <= v <= maximum and math.isfinite(v)) or positive and v <= 0


def _removal(**kw: Any) -> Callable[[], Any]:
    kw.setdefault("diagnostics", False)
    problem = kw.pop("problem", PROB)
    lam = kw.pop("meta_params", problem.init_params())
    train = kw.pop("train_tasks", TASKS)
    return lambda: mf.removal_effects(problem, lam, train, target=kw.pop("target", TARGET), **kw)


@FAST
@given(v=ANY_NUMBER)
def test_metaproblem_damping(v):
    _check(lambda: _removal(problem=_problem(damping=v))(), ("damping",), _bad_float(v))


@FAST
@given(v=ANY_NUMBER)
def test_metaproblem_chunk_size(v):
    bad = _bad_int(v, 1, optional=True)
    _check(lambda: _removal(problem=_problem(chunk_size=v))(), ("chunk_size",), bad)


@FAST
@given(v=ANY_NUMBER)
def test_removal_effects_solve_damping(v):
    _check(_removal(solve_damping=v), ("solve_damping",), _bad_float(v))


@FAST
@given(v=ANY_NUMBER, name=st.sampled_from(["lanczos_steps", "newton_check"]))
def test_removal_effects_int_arguments(v, name):
    minimum = 1 if name == "lanczos_steps" else 0
    kw = {name: v, "diagnostics": True}
    _check(_removal(**kw), (name,), _bad_int(v, minimum))


@FAST
@given(v=ANY_NUMBER)
def test_removal_effects_diagnostics_flag(v):
    _check(_removal(diagnostics=v), ("diagnostics",), not isinstance(v, bool))


@FAST
@given(v=ANY_NUMBER)
def test_edit_newton_steps(v):
    lam = PROB.init_params()
    call = lambda: mf.edit(PROB, lam, TASKS, remove={"task": [0]}, newton_steps=v)  # noqa: E731
    _check(call, ("newton_steps",), _bad_int(v, 0))


@FAST
@given(
    v=ANY_NUMBER,
    name=st.sampled_from(["rank", "power_iters", "seed", "solve_damping"]),
)
def test_fit_curvature_arguments(v, name):
    lam = PROB.init_params()
    call = lambda: mf.fit_curvature(PROB, lam, TASKS, method="lowrank", **{name: v})  # noqa: E731
    bad = _bad_float(v) if name == "solve_damping" else _bad_int(v, 1 if name == "rank" else 0)
    _check(call, (name,), bad)


@FAST
@given(v=ANY_NUMBER, name=st.sampled_from(["batch_size", "outer_lr"]))
def test_meta_train_arguments(v, name):
    if name == "outer_lr" and isinstance(v, float) and math.isfinite(v) and v > 3:
        v = 3.0  # a valid but huge step diverges: not a validation matter
    kw = {"steps": 2, "outer_lr": 0.1, name: v}
    call = lambda: mf.train.meta_train(PROB, PROB.model, TASKS, **kw)  # noqa: E731
    bad = _bad_int(v, 1, optional=True) if name == "batch_size" else _bad_float(v, positive=True)
    _check(call, (name,), bad)


def test_meta_train_steps_seed_tol_strictly_typed():
    for kw in ({"steps": 2.5}, {"steps": True}, {"seed": 1.5}, {"tol": "x"}):
        with pytest.raises(TypeError, match=next(iter(kw))):
            mf.train.meta_train(PROB, PROB.model, TASKS, outer_lr=0.1, **dict({"steps": 1}, **kw))


# ---- tensors: tasks, weights, meta_params, targets ------------------------------------------


def _mutate(t: torch.Tensor, how: str, is_label: bool) -> torch.Tensor:
    if how == "nan":
        return (t.double() if is_label else t.clone()).index_fill(0, torch.tensor([0]), NAN)
    if how == "inf":
        return (t.double() if is_label else t.clone()).index_fill(0, torch.tensor([0]), INF)
    if how == "overflow":
        return t.double() * 1e300 + 1e300
    if how == "float64":
        return t.double() if not is_label else t
    if how == "extra_dim":
        return t.unsqueeze(-1)
    if how == "drop_dim":
        return t.reshape(-1) if t.dim() > 1 else t[:0]
    if how == "wider":
        return torch.cat([t, t[..., :1]], -1) if t.dim() > 1 else torch.cat([t, t[:1]])
    if how == "int":
        return t.long() if t.is_floating_point() else t + 7
    if how == "bool":
        return t > 0
    raise AssertionError(how)


MUTATIONS = st.sampled_from(
    ["nan", "inf", "overflow", "float64", "extra_dim", "drop_dim", "wider", "int", "bool"]
)
FIELDS = st.sampled_from(["support x", "support y", "query x", "query y"])


def _mutated_task(task: mf.Task, field: str, how: str, tid: str) -> mf.Task:
    set_name, which = field.split()
    x, y = getattr(task, set_name)
    if which == "x":
        x = _mutate(x, how, False)
    else:
        y = _mutate(y, how, True)
    pair = {"support": task.support, "query": task.query, set_name: (x, y)}
    return mf.Task(id=tid, **pair)


@FAST
@given(
    field=FIELDS,
    how=MUTATIONS,
    where=st.sampled_from(["list", "batch", "source", "target"]),
)
def test_task_fields(field, how, where):
    bad = _mutated_task(mk(1), field, how, "bad")
    if where == "target":
        call = _removal(target=[bad])
    else:
        tasks = [bad] if where != "list" else [mk(0), bad]
        if where == "batch":
            try:
                tasks = mf.TaskBatch.from_tasks(tasks)
            except ERRORS as e:
                assert "'bad'" in str(e) or "task" in str(e)
                return
        train = mf.TaskSource(tasks) if where == "source" else tasks
        call = _removal(train_tasks=train)
    # (integer or bool features stacked with float ones become floats: valid)
    must = how in ("nan", "inf", "overflow", "extra_dim", "drop_dim", "wider")
    _check(call, ("'bad'", "task"), must)


WEIGHT_VALUES = st.sampled_from([NAN, INF, -1.0, 0.0, 0.5, 2.0, 1e300])


@FAST
@given(
    size=st.integers(0, 5),
    value=WEIGHT_VALUES,
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
    as_list=st.booleans(),
    where=st.sampled_from(["list", "batch", "source"]),
)
def test_task_weight(size, value, dtype, as_list, where):
    w = torch.full((size,), 1.0, dtype=torch.float64)
    if size:
        w[0] = value
    tw: Any = w.tolist() if as_list else w.to(dtype) if not math.isnan(value) else w
    train: Any = {"list": TASKS, "batch": mf.TaskBatch.from_tasks(TASKS)}.get(where)
    train = mf.TaskSource(TASKS) if train is None else train
    value_bad = not math.isfinite(value) or value == 1e300 and (as_list or dtype != torch.float64)
    must = size != 3 or dtype == torch.bool and not as_list or value_bad
    if value == 1e300 and dtype in (torch.int64, torch.bool) and not as_list:
        must = size != 3 or dtype == torch.bool  # the integer cast saturates: a finite weight
    _check(_removal(train_tasks=train, task_weight=tw), ("task_weight",), must)


@FAST
@given(
    field=st.sampled_from(["support_weight", "query_weight"]),
    value=WEIGHT_VALUES,
    size_delta=st.integers(-1, 1),
)
def test_point_weights(field, value, size_delta):
    t = mk(1)
    n = (t.support if field == "support_weight" else t.query)[0].shape[0] + size_delta
    w = torch.ones(max(n, 0), dtype=torch.float64)
    if n > 0:
        w[0] = value
    bad = mf.Task(support=t.support, query=t.query, id="bad", **{field: w})
    must = size_delta != 0 or not math.isfinite(value) or value == 1e300
    _check(_removal(train_tasks=[mk(0), bad]), ("'bad'",), must)


PARAM_MUTATIONS = st.sampled_from(
    ["drop", "extra", "shape", "nan", "int", "none", "list", "flat", "flat_short", "float64"]
)


@FAST
@given(how=PARAM_MUTATIONS, entry=st.sampled_from(["removal", "param_influence", "edit", "fit"]))
def test_meta_params(how, entry):
    lam: Any = PROB.init_params()
    if how == "drop":
        del lam["2.bias"]
    elif how == "extra":
        lam["head.weight"] = torch.zeros(2)
    elif how == "shape":
        lam["0.bias"] = torch.zeros(5)
    elif how == "nan":
        lam["0.bias"] = lam["0.bias"] * NAN
    elif how == "int":
        lam["0.bias"] = lam["0.bias"].long()
    elif how == "none":
        lam = None
    elif how == "list":
        lam = list(lam.values())
    elif how == "flat":
        lam = PROB.flat(lam)
    elif how == "flat_short":
        lam = PROB.flat(lam)[:-1]
    elif how == "float64":
        lam = {k: v.double() for k, v in lam.items()}
    remove = {"task": [0]}
    calls = {
        "removal": _removal(meta_params=lam),
        "param_influence": lambda: mf.param_influence(PROB, lam, TASKS, remove=remove),
        "edit": lambda: mf.edit(PROB, lam, TASKS, remove=remove),
        "fit": lambda: mf.fit_curvature(PROB, lam, TASKS),
    }
    _check(calls[entry], ("meta_params",), how not in ("flat", "float64"))


REMOVALS = st.one_of(
    st.dictionaries(
        st.sampled_from(["task", "support_point", "query_point", "tasks"]),
        st.lists(
            st.one_of(
                st.integers(-2, 6),
                st.tuples(st.integers(-1, 6), st.integers(-1, 6)),
                st.sampled_from([1.5, True, "t0", None]),
            ),
            max_size=4,
        ),
        max_size=2,
    ),
    st.sampled_from([None, [0], "task", 0]),
)


@FAST
@given(remove=REMOVALS, entry=st.sampled_from([mf.param_influence, mf.edit]))
def test_remove(remove, entry):
    _check(lambda: entry(PROB, PROB.init_params(), TASKS, remove=remove), ("remove", "kind"), False)


# ---- per-sample gradients ---------------------------------------------------------------------


@FAST
@given(which=st.sampled_from(["x", "y"]), how=MUTATIONS)
def test_per_sample_grads_inputs(which, how):
    x, y = mk(0).support
    if which == "x":
        x = _mutate(x, how, False)
    else:
        y = _mutate(y, how, True)
    params = PROB.init_params()
    must = how in ("nan", "inf", "overflow", "extra_dim", "drop_dim", "wider", "bool") or (
        how == "int" and which == "x"
    )
    _check(lambda: mf.per_sample_grads(PROB.model, params, x, y), (which,), must)
