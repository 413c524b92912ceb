"""Audit of the public entries (``metafluence.__init__`` / api.md) against hostile arguments:
shapes, dtypes, devices, label ranges, finiteness, empty sets and duplicate ids. Every case
must raise ``ValueError`` / ``TypeError`` (or ``KeyError`` for a missing name) with a message
naming the bad item -- never a crash, a bare ``RuntimeError`` from deep inside torch, or a
silently wrong result. (``tests/bilevel/test_validation.py`` covers the task-field basics:
shapes across tasks, empty sets, x/y lengths, label range, float labels, NaN data, NaN/missing
meta-parameters, duplicate train ids; not repeated here.)

Cases marked ``xfail(strict=True)`` are known gaps in modules owned elsewhere; the reason says
the fix. They turn into failures (strict) as soon as the fix lands, so the marker is removed
then.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import metafluence as mf
from tests.bilevel.test_validation import mk

from ._strategies import require_kanjivg

# the meta device stands in for "another device" on a CPU-only machine: tensors there have
# shapes and dtypes but no data, exactly like CUDA tensors seen from CPU code
OTHER = "cuda" if torch.cuda.is_available() else "meta"


@pytest.fixture
def tasks():
    return [mk(0), mk(1), mk(2)]


def _removal(prob, lam, tasks, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.removal_effects(prob, lam, tasks, solver_kwargs={"maxiter": 5}, **kw)


# ---- inner-map configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make, err, words",
    [
        (lambda: mf.inner.Unrolled(steps=1.5, lr=0.1), TypeError, "Unrolled(steps) must be an int"),
        (
            lambda: mf.inner.Unrolled(steps=True, lr=0.1),
            TypeError,
            "Unrolled(steps) must be an int",
        ),
        (lambda: mf.inner.Unrolled(steps=1, lr=float("inf")), ValueError, "Unrolled(lr)=inf"),
        (lambda: mf.inner.Unrolled(steps=1, lr="fast"), TypeError, "Unrolled(lr) must be a float"),
        (lambda: mf.inner.Implicit(reg=float("nan")), ValueError, "Implicit(reg)=nan"),
        (lambda: mf.inner.Implicit(maxiter=0), ValueError, "Implicit(maxiter)=0"),
        (lambda: mf.inner.Implicit(newton_steps=2.0), TypeError, "Implicit(newton_steps)"),
        (lambda: mf.inner.Implicit(rtol=-1.0), ValueError, "Implicit(rtol)=-1.0"),
        (lambda: mf.inner.HeadOnly(head="h", steps=-2), ValueError, "Unrolled(steps)=-2"),
    ],
)
def test_inner_configuration(make, err, words):
    with pytest.raises(err, match=_re(words)):
        make()


def test_inner_accepts_numpy_ints():
    assert mf.inner.Unrolled(steps=np.int64(2), lr=np.float32(0.1)).steps == 2


# ---- removal_effects: the target side, damping, meta-parameters ------------------------------


def test_target_tasks_validated_like_train_tasks(prob, tasks):
    lam = prob.init_params()
    with pytest.raises(ValueError, match="duplicate task id 't5'"):
        _removal(prob, lam, tasks, target=[mk(5), mk(5)])
    with pytest.raises(ValueError, match=r"task 't5': \w+ y has label \d outside \[0, 3\)"):
        _removal(prob, lam, tasks, target=[mk(5, classes=7, seed=3)])
    bad = mf.Task(support=mk(5).support, query=(mk(5).query[0] * np.nan, mk(5).query[1]), id="n")
    with pytest.raises(ValueError, match="task 'n': query x contains NaN or Inf"):
        _removal(prob, lam, tasks, target=[bad])
    with pytest.raises(ValueError, match="tasks is empty"):
        _removal(prob, lam, tasks, target=[])
    with pytest.raises(ValueError, match="tasks is empty"):
        _removal(prob, lam, [], target=[mk(5)])


def test_target_callable_must_return_a_scalar(prob, tasks):
    lam = prob.init_params()
    with pytest.raises(ValueError, match="target callable must return a scalar"):
        _removal(prob, lam, tasks, target=lambda p: p["0.weight"].sum(0))


def test_target_callable_non_finite_names_target(prob, tasks):
    lam = prob.init_params()
    with pytest.raises(ValueError, match="target"):
        _removal(prob, lam, tasks, target=lambda p: p["0.weight"].sum() * float("nan"))


def test_solve_damping_inf_names_solve_damping(prob, tasks):
    with pytest.raises(ValueError, match="solve_damping"):
        _removal(prob, prob.init_params(), tasks, target=[mk(5)], solve_damping=float("inf"))


def test_solve_damping_nan(prob, tasks):
    with pytest.raises(ValueError, match="solve_damping=nan"):
        _removal(prob, prob.init_params(), tasks, target=[mk(5)], solve_damping=float("nan"))


def test_metaproblem_arguments(prob):
    for damping in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="damping="):
            mf.MetaProblem(prob.model, damping=damping)
    with pytest.raises(ValueError, match="loss='hinge'"):
        mf.MetaProblem(prob.model, loss="hinge")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mf.MetaProblem("model")


def test_train_tasks_of_wrong_type(prob):
    with pytest.raises(TypeError, match="train_tasks of type int"):
        _removal(prob, prob.init_params(), 5, target=[mk(5)])


_GAP_DEVICE = (
    "bilevel/problem.py + tasks.py (lead): meta_params / task tensors on another device than "
    "the rest raise a RuntimeError deep in torch ('Tensor.item() cannot be called on meta "
    "tensors', 'Expected all tensors to be on the same device'); check in the meta_params / "
    "TaskBatch validation that every meta_params[name] and every task field is on the device "
    "of the first task, and raise ValueError(\"meta_params['0.weight'] is on cuda:0 but the "
    'tasks are on cpu")'
)


def test_meta_params_on_another_device(prob, tasks):
    lam = {k: v.to(OTHER) for k, v in prob.init_params().items()}
    with pytest.raises(ValueError, match=r"meta_params\['0.weight'\] is on"):
        prob.outer_loss(lam, tasks)


def test_task_on_another_device(prob, tasks):
    t = mk(3)
    other = mf.Task(support=(t.support[0].to(OTHER), t.support[1].to(OTHER)), query=t.query, id="d")
    with pytest.raises(ValueError, match="task 'd'.* is on"):
        prob.outer_loss(prob.init_params(), [*tasks, other])


def test_meta_params_integer_dtype(prob, tasks):
    lam = {k: v.long() for k, v in prob.init_params().items()}
    with pytest.raises(TypeError, match=r"meta_params\['0.weight'\] has dtype torch.int64"):
        prob.outer_loss(lam, tasks)


def test_class_labels_must_be_1d(prob):
    t = mk(0)
    bad = mf.Task(support=(t.support[0], t.support[1][:, None]), query=t.query, id="y2")
    with pytest.raises(ValueError, match="task 'y2': support y has shape"):
        prob.outer_loss(prob.init_params(), [bad])


def test_unhashable_task_id(prob):
    t = mk(0)
    with pytest.raises(TypeError, match="task 0: id"):
        prob.outer_loss(prob.init_params(), [mf.Task(support=t.support, query=t.query, id=[1])])


def test_tasks_list_with_non_task(prob):
    with pytest.raises(TypeError, match=r"tasks\[0\] is int"):
        prob.outer_loss(prob.init_params(), [1, 2])


# ---- remove= (param_influence / edit) --------------------------------------------------------


def test_remove_out_of_range_and_unknown_kind(prob, tasks):
    lam = prob.init_params()
    with pytest.raises(ValueError, match=r"remove\['task'\] index 7 outside \[0, 3\)"):
        mf.param_influence(prob, lam, tasks, remove={"task": [7]})
    with pytest.raises(ValueError, match="item kind 'tasks'"):
        mf.param_influence(prob, lam, tasks, remove={"tasks": [0]})
    with pytest.raises(ValueError, match=r"remove\['support_point'\] item \(0, 9\) outside"):
        mf.param_influence(prob, lam, tasks, remove={"support_point": [(0, 9)]})
    with pytest.raises(ValueError, match=r"remove\['query_point'\] item \(0, -1\) outside"):
        mf.param_influence(prob, lam, tasks, remove={"query_point": [(0, -1)]})


_GAP_REMOVE = (
    "data/tasks.py item_masks (lead): remove entries go through int(), so a task id string "
    "('t0') fails with \"invalid literal for int() with base 10: 't0'\", a float position 1.7 "
    "is silently truncated to 1, and a position listed twice is silently merged; use "
    "operator.index(e) (TypeError naming remove['task'] and the item, saying positions are "
    "expected) and raise ValueError(\"remove['task'] lists position 0 twice\") on repeats"
)


def test_remove_task_by_id_string(prob, tasks):
    with pytest.raises(TypeError, match=r"remove\['task'\].*'t0'"):
        mf.param_influence(prob, prob.init_params(), tasks, remove={"task": ["t0"]})


def test_remove_float_position(prob, tasks):
    with pytest.raises(TypeError, match=r"remove\['task'\]"):
        mf.param_influence(prob, prob.init_params(), tasks, remove={"task": [1.7]})


def test_remove_duplicate_position(prob, tasks):
    with pytest.raises(ValueError, match=r"remove\['task'\] lists position 0 twice"):
        mf.edit(prob, prob.init_params(), tasks, remove={"task": [0, 0]})


# ---- meta_train ------------------------------------------------------------------------------


def test_meta_train_arguments(prob, tasks):
    model = prob.model
    with pytest.raises(ValueError, match="steps=-1"):
        mf.train.meta_train(prob, model, tasks, steps=-1, outer_lr=0.1)
    with pytest.raises(ValueError, match="tasks is empty"):
        mf.train.meta_train(prob, model, [], steps=2, outer_lr=0.1)
    with pytest.raises(ValueError, match="duplicate task id 't0'"):
        mf.train.meta_train(prob, model, [mk(0), mk(0)], steps=2, outer_lr=0.1)


def test_meta_train_batch_size_and_lr(prob, tasks):
    with pytest.raises(ValueError, match="batch_size"):
        mf.train.meta_train(prob, prob.model, tasks, steps=2, outer_lr=0.1, batch_size=0)
    with pytest.raises(ValueError, match="outer_lr"):
        mf.train.meta_train(prob, prob.model, tasks, steps=2, outer_lr=float("nan"))


# ---- per-sample gradients --------------------------------------------------------------------


def test_psg_arguments(prob):
    lam = prob.init_params()
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="loss='hinge'"):
        mf.per_sample_grads(prob.model, lam, x, y, loss="hinge")
    with pytest.raises(ValueError, match=r"vectors\['0.weight'\] has shape \(2, 7\)"):
        mf.per_sample_grad_dots(prob.model, lam, x, y, {k: torch.zeros(2, 7) for k in lam})
    with pytest.raises(KeyError, match="vectors has no entry for parameter '0.weight'"):
        mf.per_sample_grad_dots(prob.model, lam, x, y, {})


def test_psg_bad_x_y_and_devices(prob):
    lam = prob.init_params()
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match=r"\by\b.*4.*\bx\b.*5|\bx\b.*5.*\by\b.*4"):
        mf.per_sample_grads(prob.model, lam, x, y[:4])
    with pytest.raises(ValueError, match="y has label 5"):
        mf.per_sample_grads(prob.model, lam, x, y + 5)
    with pytest.raises(ValueError, match=r"params\['0.weight'\] is on"):
        mf.per_sample_grads(prob.model, {k: v.to(OTHER) for k, v in lam.items()}, x, y)


# ---- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    require_kanjivg()
    mp = pytest.MonkeyPatch()
    mp.setenv("METAFLUENCE_CACHE", str(tmp_path_factory.mktemp("glyphs")))
    try:
        yield mf.data.load_glyphs(num_classes=6, samples=4)
    finally:
        mp.undo()


@pytest.mark.parametrize(
    "kw, err, words",
    [
        ({"ways": 2.7}, TypeError, "ways must be an int, got float 2.7"),
        ({"ways": "2"}, TypeError, "ways must be an int, got str"),
        ({"ways": 1}, ValueError, "ways=1: expected >= 2"),
        ({"shots": 0}, ValueError, "shots=0: expected >= 1"),
        ({"queries": -3}, ValueError, "queries=-3"),
        ({"num_tasks": 0}, ValueError, "num_tasks=0"),
        ({"seed": -1}, ValueError, "seed=-1"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating torch.dtype"),
        ({"split": "dev"}, ValueError, "split='dev'"),
        ({"ways": 50}, ValueError, "a 50-way task needs 50"),
        ({"shots": 3, "queries": 3}, ValueError, "at least 6 images (shots + queries)"),
    ],
)
def test_sample_tasks_arguments(glyphs, kw, err, words):
    args = dict(ways=2, shots=1, queries=1, num_tasks=2)
    args.update(kw)
    with pytest.raises(err, match=_re(words)):
        mf.data.sample_tasks(glyphs, **args)


def test_sample_tasks_accepts_numpy_ints_and_ids_are_unique(glyphs):
    ts = mf.data.sample_tasks(glyphs, ways=np.int64(2), shots=1, queries=1, num_tasks=5)
    assert len({t.id for t in ts}) == 5


@pytest.mark.parametrize(
    "kw, err, words",
    [
        ({"fraction": 1.5}, ValueError, "fraction=1.5: expected <= 1.0"),
        ({"fraction": float("nan")}, ValueError, "fraction=nan"),
        ({"fraction": "half"}, TypeError, "fraction must be a float"),
        ({"seed": 0.5}, TypeError, "seed must be an int"),
        ({"level": "class"}, ValueError, "level='class'"),
        ({"where": "both"}, ValueError, "where='both'"),
    ],
)
def test_flip_labels_arguments(tasks, kw, err, words):
    with pytest.raises(err, match=_re(words)):
        mf.data.flip_labels(tasks, **kw)


@pytest.mark.parametrize(
    "kw, err, words",
    [
        ({"num_classes": 2}, ValueError, "glyphs: num_classes=2: expected >= 3"),
        ({"samples": "2"}, TypeError, "glyphs: samples must be an int"),
        ({"size": 0}, ValueError, "glyphs: size=0: expected >= 4"),
        ({"seed": -4}, ValueError, "glyphs: seed=-4"),
        ({"max_strokes": 1}, ValueError, "glyphs: max_strokes=1"),
    ],
)
def test_load_glyphs_arguments(kw, err, words):
    args = dict(num_classes=3, samples=2, cache=False)
    args.update(kw)
    with pytest.raises(err, match=_re(words)):
        mf.data.load_glyphs(**args)


def test_load_spec_errors():
    with pytest.raises(mf.data.DatasetLayoutError, match="kind one of"):
        mf.data.load("imagenet:/x")
    with pytest.raises(mf.data.DatasetLayoutError, match="missing path"):
        mf.data.load("npz:")


# ---- evaluation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pred, truth, words",
    [
        (torch.ones(3), torch.ones(4), "pred has 3 values but truth has 4"),
        (torch.tensor([1.0, float("nan"), 2.0]), torch.ones(3), "pred has 1 NaN/Inf values"),
        (torch.ones(3), torch.tensor([float("inf"), 0.0, 1.0]), "truth has 1 NaN/Inf"),
        (torch.ones(0), torch.ones(0), "empty"),
        ([torch.ones(2), torch.ones(1)], torch.ones(2), "pred has 3 values but truth has 2"),
    ],
)
def test_correlation_arguments(pred, truth, words):
    with pytest.raises(ValueError, match=_re(words)):
        mf.evaluate.correlation(pred, truth)


def test_correlation_degenerate_is_nan_not_error():
    out = mf.evaluate.correlation(torch.ones(3), torch.arange(3.0))
    assert np.isnan(out["pearson"]) and out["n"] == 3


# ---- solvers via the public entry ------------------------------------------------------------


def test_solve_cg_public_entry():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="b contains NaN or Inf"):
        mf.solvers.solve_cg(lambda v: v @ A, torch.tensor([1.0, np.nan, 0.0], dtype=A.dtype))
    with pytest.raises(ValueError, match="matvec returned a tensor on meta"):
        mf.solvers.solve_cg(lambda v: v.to("meta"), torch.ones(2, 3, dtype=A.dtype))


def _re(s: str) -> str:
    import re

    return re.escape(s)
