"""The validation layer at the public boundary (issue 17): every way in is checked once.

One class of bad input per test: values that used to skip the checks (a ``TaskBatch``, a
``TaskSource``, weights), values that overflow the model's dtype, features and labels that do
not fit the model (the one-task dry run), ``meta_params`` of the wrong kind, numeric arguments of
the wrong type or range, and removals that leave nothing. Each must raise ``ValueError`` /
``TypeError`` naming the argument (and the task and set where there is one).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

import metafluence as mf
from tests.bilevel.test_validation import mk

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def tasks() -> list[mf.Task]:
    return [mk(0), mk(1), mk(2)]


def _removal(problem: mf.MetaProblem, lam, train, **kw) -> mf.InfluenceResult:
    kw.setdefault("target", [mk(5)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mf.removal_effects(problem, lam, train, diagnostics=False, **kw)


def _with(task: mf.Task, **changes) -> mf.Task:
    return dataclasses.replace(task, **changes)


# ---- (a) ways in that skipped the value checks -----------------------------------------------


@pytest.mark.parametrize("field", ["xs", "xq"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_task_batch_non_finite_data(prob, tasks, field, value):
    b = mf.TaskBatch.from_tasks(tasks)
    bad = getattr(b, field).clone()
    bad[1, 0, 0] = value
    what = "support x" if field == "xs" else "query x"
    with pytest.raises(ValueError, match=f"task 't1': {what} contains NaN or Inf"):
        _removal(prob, prob.init_params(), dataclasses.replace(b, **{field: bad}))


@pytest.mark.parametrize("field", ["task_weight", "support_weight", "query_weight"])
def test_task_batch_non_finite_weights(prob, tasks, field):
    b = mf.TaskBatch.from_tasks(tasks)
    bad = getattr(b, field).clone()
    bad[2] = NAN
    with pytest.raises(ValueError, match=f"task 't2': {field} contains NaN or Inf"):
        _removal(prob, prob.init_params(), dataclasses.replace(b, **{field: bad}))


@pytest.mark.parametrize(
    "field, shape, words",
    [
        ("ys", (3, 2), r"TaskBatch.ys has shape \(3, 2\), expected \(3, 4, '...'\)"),
        ("task_weight", (2,), r"TaskBatch.task_weight has shape \(2,\), expected \(3,\)"),
        ("support_weight", (3, 4, 1), r"support_weight has shape \(3, 4, 1\), expected \(3, 4\)"),
        ("query_weight", (3, 4), r"query_weight has shape \(3, 4\), expected \(3, 5\)"),
    ],
)
def test_task_batch_inconsistent_fields(prob, tasks, field, shape, words):
    b = mf.TaskBatch.from_tasks(tasks)
    bad = dataclasses.replace(b, **{field: torch.zeros(shape, dtype=getattr(b, field).dtype)})
    with pytest.raises(ValueError, match=words):
        prob.outer_loss(prob.init_params(), bad)


def test_task_batch_ids(prob, tasks):
    b = mf.TaskBatch.from_tasks(tasks)
    with pytest.raises(ValueError, match="TaskBatch.ids must be a list of M=3"):
        prob.outer_loss(prob.init_params(), dataclasses.replace(b, ids=["a"]))
    with pytest.raises(ValueError, match="duplicate task id 'a'"):
        prob.outer_loss(prob.init_params(), dataclasses.replace(b, ids=["a", "b", "a"]))


def test_task_source_items_checked_after_reading(prob, tasks):
    bad = _with(mk(3), query=(mk(3).query[0] * NAN, mk(3).query[1]), id="s3")
    with pytest.raises(ValueError, match="task 's3': query x contains NaN or Inf"):
        _removal(prob, prob.init_params(), mf.TaskSource([*tasks, bad]))


@pytest.mark.parametrize("make", [list, mf.TaskSource, mf.TaskBatch.from_tasks])
def test_task_weight_non_finite(prob, tasks, make):
    with pytest.raises(ValueError, match="task_weight contains NaN or Inf"):
        _removal(prob, prob.init_params(), make(tasks), task_weight=torch.tensor([1, NAN, 1]))


@pytest.mark.parametrize(
    "weight, err, words",
    [
        (torch.ones(4), ValueError, r"task_weight has shape \(4,\), expected \(3,\)"),
        ("1/M", TypeError, "task_weight must be a tensor of M=3 weights"),
        (torch.ones(3, dtype=torch.bool), TypeError, "task_weight has dtype torch.bool"),
    ],
)
def test_task_weight_type_and_shape(prob, tasks, weight, err, words):
    with pytest.raises(err, match=words):
        _removal(prob, prob.init_params(), tasks, task_weight=weight)


@pytest.mark.parametrize("field", ["support_weight", "query_weight"])
def test_point_weights_non_finite(prob, tasks, field):
    n = 4 if field == "support_weight" else 5
    w = torch.ones(n)
    w[0] = INF
    bad = _with(mk(3), id="w", **{field: w})
    with pytest.raises(ValueError, match=f"task 'w': {field} contains NaN or Inf"):
        _removal(prob, prob.init_params(), [*tasks, bad])


# ---- (b) finite in float64, Inf in the model's float32 --------------------------------------


def _huge(task: mf.Task, tid: str) -> mf.Task:
    return _with(task, support=(task.support[0].double() * 1e300, task.support[1]), id=tid)


@pytest.mark.parametrize("make", [list, mf.TaskSource, mf.TaskBatch.from_tasks])
def test_float64_data_overflowing_float32(prob, tasks, make):
    train = make([tasks[0], _huge(tasks[1], "big")])
    with pytest.raises(ValueError, match="task 'big': support x has values up to .* overflow"):
        _removal(prob, prob.init_params(), train)


def test_float64_data_fits_a_float64_model(tasks):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    p64 = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.1))
    x = tasks[0].support[0].double() * 1e30
    res = _removal(p64, p64.init_params(), [_with(tasks[0], support=(x, tasks[0].support[1]))])
    assert bool(torch.isfinite(res.scores).all())


def test_float64_task_weight_overflowing_float32(prob, tasks):
    tw = torch.tensor([1.0, 1e300, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="task 't1': task_weight has values up to 1e\\+300"):
        _removal(prob, prob.init_params(), tasks, task_weight=tw)


def test_float64_target_overflowing_float32(prob, tasks):
    with pytest.raises(ValueError, match="task 'tg': support x has values up to"):
        _removal(prob, prob.init_params(), tasks, target=[_huge(mk(5), "tg")])


def test_meta_params_overflow_names_the_entry(prob, tasks):
    lam = prob.init_params()
    lam["2.bias"] = torch.full((3,), 1e300, dtype=torch.float64)  # the cat promotes to float64
    lam["0.weight"] = lam["0.weight"].clone()
    lam["0.weight"][0, 0] = INF
    with pytest.raises(ValueError, match=r"meta_params\['0.weight'\] contains NaN or Inf"):
        prob.outer_loss(lam, tasks)


# ---- (c) features and labels that do not fit the model: the one-task dry run ----------------


def test_train_features_do_not_fit(prob):
    with pytest.raises(
        ValueError, match=r"task 't0': support x of shape \(4, 5\).*\[N, \.\.\., 3\]"
    ):
        _removal(prob, prob.init_params(), [mk(0, d=5), mk(1, d=5)])


def test_target_features_do_not_fit(prob, tasks):
    with pytest.raises(ValueError, match=r"task 't5': support x of shape \(4, 5\).*\[N, 3\] like"):
        _removal(prob, prob.init_params(), tasks, target=[mk(5, d=5)])


def test_query_features_do_not_fit(prob):
    t = mk(0)
    bad = _with(t, query=(torch.randn(5, 7), t.query[1]), id="q")
    with pytest.raises(ValueError, match=r"task 'q': query x of shape \(5, 7\) .* does not fit"):
        prob.outer_loss(prob.init_params(), [bad])


class _Conv4(nn.Module):
    """A tiny conv net for 1×12×12 images (its head fixes the spatial size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2 * 10 * 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).flatten(1))


def _images(i: int, size: int) -> mf.Task:
    g = torch.Generator().manual_seed(i)
    return mf.Task(
        support=(
            torch.randn(2, 1, size, size, generator=g),
            torch.randint(0, 3, (2,), generator=g),
        ),
        query=(torch.randn(2, 1, size, size, generator=g), torch.randint(0, 3, (2,), generator=g)),
        id=f"img{i}",
    )


def test_larger_images_into_a_small_conv_net():
    conv = mf.MetaProblem(_Conv4(), inner=mf.inner.Unrolled(steps=1, lr=0.1))
    with pytest.raises(ValueError, match=r"task 'img0': support x .* \[N, 1, \.\.\.\] .*Conv2d"):
        conv.outer_loss(conv.init_params(), [_images(0, 36)])
    conv.outer_loss(conv.init_params(), [_images(1, 12)])  # fits: remembered
    with pytest.raises(ValueError, match=r"task 'img2': .* expected \[N, 1, 12, 12\] like"):
        conv.outer_loss(conv.init_params(), [_images(2, 36)])


def _regression(i: int, y_shape: tuple[int, ...], tid: str | None = None) -> mf.Task:
    g = torch.Generator().manual_seed(i)
    return mf.Task(
        support=(torch.randn(4, 3, generator=g), torch.randn(4, *y_shape, generator=g)),
        query=(torch.randn(5, 3, generator=g), torch.randn(5, *y_shape, generator=g)),
        id=tid or f"r{i}",
    )


@pytest.mark.parametrize("y_shape", [(), (1,), (2, 1)])
def test_mse_labels_of_the_wrong_shape(y_shape):
    mse = mf.MetaProblem(nn.Linear(3, 2), loss="mse", inner=mf.inner.Unrolled(steps=1, lr=0.1))
    shape = (4, *y_shape)
    with pytest.raises(ValueError, match=rf"task 'r0': support y has shape \({shape[0]},"):
        mse.outer_loss(mse.init_params(), [_regression(0, y_shape)])
    ok = _regression(1, (2,))
    assert torch.isfinite(mse.outer_loss(mse.init_params(), [ok]))


def test_mse_target_labels_checked_too():
    mse = mf.MetaProblem(nn.Linear(3, 1), loss="mse", inner=mf.inner.Unrolled(steps=1, lr=0.1))
    lam = mse.init_params()
    train = [_regression(0, ()), _regression(1, (1,), "r1b")]  # [N] and [N, 1] both fit one output
    with pytest.raises(
        ValueError, match=r"task 'tg': query y has shape \(5, 3\), expected \(5, 1\)"
    ):
        bad = _with(_regression(2, ()), query=(torch.randn(5, 3), torch.randn(5, 3)), id="tg")
        _removal(mse, lam, train[:1], target=[bad])
    assert torch.isfinite(mse.outer_loss(lam, train[1:]))


def test_callable_loss_returning_the_wrong_shape(tasks):
    def total(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y)  # a mean, not per-sample losses

    p = mf.MetaProblem(nn.Linear(3, 3), loss=total, inner=mf.inner.Unrolled(steps=1, lr=0.1))
    with pytest.raises(ValueError, match=r"loss 'total' returned \(\) .* expected per-sample"):
        p.outer_loss(p.init_params(), tasks)


def test_dry_run_is_cached_per_shape(prob, tasks, monkeypatch):
    calls: list[int] = []
    real = prob.fm.logits

    def counting(lam, x):
        calls.append(1)
        return real(lam, x)

    prob.outer_loss(prob.init_params(), tasks)
    monkeypatch.setattr(prob.fm, "logits", counting)
    prob._dry_run(mf.TaskBatch.from_tasks(tasks), prob.flat(prob.init_params()))
    assert calls == []  # cached: no forward for a shape that fitted


# ---- (d) meta_params -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, [1.0, 2.0], "params", 3.0])
def test_meta_params_of_the_wrong_kind(prob, tasks, value):
    with pytest.raises(TypeError, match="meta_params must be a dict name → tensor .* size P=31"):
        _removal(prob, value, tasks)


def test_meta_params_extra_key(prob, tasks):
    lam = {**prob.init_params(), "3.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"meta_params has entries \['3.weight'\]"):
        mf.param_influence(prob, lam, tasks, remove={"task": [0]})


def test_meta_params_flat_vector(prob, tasks):
    lam = prob.flat(prob.init_params())
    _removal(prob, lam, tasks)  # the flat [P] vector is accepted
    with pytest.raises(ValueError, match=r"meta_params vector has shape \(30,\), expected \(31,\)"):
        _removal(prob, lam[:30], tasks)
    with pytest.raises(TypeError, match="meta_params has dtype torch.int64"):
        _removal(prob, lam.long(), tasks)


def test_meta_params_entry_not_a_tensor(prob, tasks):
    lam = {**prob.init_params(), "2.bias": [0.0, 0.0, 0.0]}
    with pytest.raises(TypeError, match=r"meta_params\['2.bias'\] is list, expected a tensor"):
        mf.edit(prob, lam, tasks, remove={"task": [0]})


# ---- (e) numeric arguments: strict types, ranges --------------------------------------------


@pytest.mark.parametrize(
    "kw, err, words",
    [
        ({"chunk_size": True}, TypeError, "chunk_size must be an int, got bool"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size must be an int, got float 2.5"),
        ({"chunk_size": "2"}, TypeError, "chunk_size must be an int, got str"),
        ({"chunk_size": 0}, ValueError, "chunk_size=0: expected >= 1"),
        ({"damping": "1e-3"}, TypeError, "damping must be a float, got str"),
        ({"damping": True}, TypeError, "damping must be a float, got bool"),
        ({"damping": INF}, ValueError, "damping=inf"),
        ({"damping": 1e308}, ValueError, r"damping=1e\+308: expected <= 1e\+30"),
    ],
)
def test_metaproblem_numeric_arguments(prob, kw, err, words):
    with pytest.raises(err, match=words):
        mf.MetaProblem(prob.model, **kw)


def test_metaproblem_accepts_numpy_numbers(prob):
    import numpy as np

    p = mf.MetaProblem(prob.model, damping=np.float32(0.5), chunk_size=np.int64(2))
    assert p.damping == 0.5 and p.chunk_size == 2


@pytest.mark.parametrize(
    "kw, err, words",
    [
        ({"solve_damping": 1e308}, ValueError, r"solve_damping=1e\+308: expected <= 1e\+30"),
        ({"solve_damping": "1e-3"}, TypeError, "solve_damping must be a float, got str"),
        ({"solve_damping": True}, TypeError, "solve_damping must be a float, got bool"),
        ({"lanczos_steps": 2.0}, TypeError, "lanczos_steps must be an int, got float"),
        ({"newton_check": True}, TypeError, "newton_check must be an int, got bool"),
        ({"diagnostics": "no"}, TypeError, "diagnostics must be a bool, got str"),
        ({"diagnostics": 0}, TypeError, "diagnostics must be a bool, got int"),
    ],
)
def test_removal_effects_numeric_arguments(prob, tasks, kw, err, words):
    with pytest.raises(err, match=words):
        mf.removal_effects(prob, prob.init_params(), tasks, target=[mk(5)], **kw)


def test_edit_and_param_influence_numeric_arguments(prob, tasks):
    lam = prob.init_params()
    with pytest.raises(ValueError, match="newton_steps=-1: expected >= 0"):
        mf.edit(prob, lam, tasks, remove={"task": [0]}, newton_steps=-1)
    with pytest.raises(TypeError, match="newton_steps must be an int, got float"):
        mf.edit(prob, lam, tasks, remove={"task": [0]}, newton_steps=1.0)
    with pytest.raises(TypeError, match="return_result must be a bool"):
        mf.param_influence(prob, lam, tasks, remove={"task": [0]}, return_result="yes")
    with pytest.raises(ValueError, match=r"solve_damping=1e\+31"):
        mf.fit_curvature(prob, lam, tasks, solve_damping=1e31)


# ---- (f) removals that leave nothing, removals of the wrong type ----------------------------


@pytest.mark.parametrize("entry", [mf.param_influence, mf.edit])
def test_removing_every_task(prob, tasks, entry):
    with pytest.raises(ValueError, match=r"remove takes out every task \(3 of 3\)"):
        entry(prob, prob.init_params(), tasks, remove={"task": [2, 0, 1]})


@pytest.mark.parametrize(
    "remove, words",
    [
        ([0, 1], "remove must be a dict kind → positions"),
        ({"task": 0}, r"remove\['task'\] must be a list of positions, got int"),
        ({"task": "t0"}, r"remove\['task'\] must be a list of positions, got str"),
    ],
)
def test_remove_of_the_wrong_type(prob, tasks, remove, words):
    with pytest.raises(TypeError, match=words):
        mf.param_influence(prob, prob.init_params(), tasks, remove=remove)


@pytest.mark.parametrize("value", [None, "tasks", torch.zeros(3, 3), {"t0": 1}])
def test_tasks_of_the_wrong_type(prob, value):
    with pytest.raises(TypeError, match="tasks must be a list of mf.Task, a TaskBatch"):
        _removal(prob, prob.init_params(), value)


# ---- (g) per-sample gradients: the same classes of bad input --------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda x, y: (x * NAN, y), "x contains NaN or Inf"),
        (lambda x, y: (torch.randn(4, 5), y), r"x of shape \(4, 5\) .* does not fit the model"),
        (lambda x, y: (x.double(), y), r"x of shape \(4, 3\) \(dtype torch.float64\) does not fit"),
        (lambda x, y: (x, y[:, None]), r"y of shape \(4, 1\) .* does not fit loss='cross_entropy'"),
        (lambda x, y: (x, y.double() * INF), "y contains NaN or Inf"),
    ],
)
def test_per_sample_grads_bad_x_y(prob, make, words):
    x, y = make(*mk(0).support)
    with pytest.raises(ValueError, match=words):
        mf.per_sample_grads(prob.model, prob.init_params(), x, y)


def test_per_sample_grads_mse_targets_must_match_the_outputs():
    """``[N]`` targets against ``[N, C]`` outputs would broadcast to a wrong loss: refused."""
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"y has shape \(4,\); loss='mse' needs .*\[4, 2\]"):
        mf.per_sample_grads(model, params, x, torch.randn(4), loss="mse")
    g = mf.per_sample_grads(model, params, x, torch.randn(4, 2), loss="mse")
    assert g["weight"].shape == (4, 2, 3)
