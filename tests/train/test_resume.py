"""Resumable meta-training: SIGKILL mid-run, rerun, bit-identical result, no step redone."""

from __future__ import annotations

import signal

import pytest
import torch

import metafluence as mf
from metafluence._store import CheckpointCorruptError, load_tensors
from metafluence.train.checkpoint import (
    default_checkpoint_path,
    load_checkpoint,
    load_train_state,
    meta_train_resumable,
    save_checkpoint,
)
from tests import resume_worker as w


def reference(steps=w.STEPS):
    model, prob = w.problem()
    return mf.train.meta_train(prob, model, w.tasks(12, 0), steps=steps, **w.TRAIN_KW)


def test_kill_and_resume_meta_train_is_bit_identical(tmp_path):
    ckpt = default_checkpoint_path(tmp_path)
    rc = w.run_and_kill("train", tmp_path, ckpt.exists, sleep=0.05)
    assert rc == -signal.SIGKILL
    killed_log = w.work_log(tmp_path)
    saved = load_checkpoint(ckpt)[1]["step"]
    assert w.EVERY <= saved < w.STEPS and saved % w.EVERY == 0
    assert len(killed_log) < w.STEPS  # really interrupted
    (tmp_path / "work.log").unlink()
    out = w.train(tmp_path)
    resumed_log = w.work_log(tmp_path)
    # only the steps after the last checkpoint ran again
    assert resumed_log == [f"step {i}" for i in range(saved, w.STEPS)]
    ref = reference()
    assert list(out) == list(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert load_checkpoint(ckpt)[1]["step"] == w.STEPS
    # a finished checkpoint is returned as is, nothing recomputed
    (tmp_path / "work.log").unlink()
    again = w.train(tmp_path)
    assert w.work_log(tmp_path) == [] and all(torch.equal(again[k], ref[k]) for k in ref)


def _tiny(opt):
    dt = torch.float64 if opt in ("lbfgs", "newton") else torch.float32
    model, prob = w.problem()
    model.to(dt)
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=1e-2)
    tasks = [
        mf.Task((t.support[0].to(dt), t.support[1]), (t.query[0].to(dt), t.query[1]), id=t.id)
        for t in w.tasks(6, 0)
    ]
    kw = {"adam": {"batch_size": 2}, "sgd": {"batch_size": 3}, "lbfgs": {"outer_lr": 0.5}}
    return model, prob, tasks, dict({"outer_lr": 0.05, "seed": 3}, **kw.get(opt, {}))


@pytest.mark.parametrize("opt", ["adam", "sgd", "lbfgs", "newton"])
def test_stop_and_extend_equals_uninterrupted(tmp_path, opt):
    """Optimizer state (Adam moments, L-BFGS history) and generator state are restored."""
    model, prob, tasks, kw = _tiny(opt)
    ref = mf.train.meta_train(prob, model, tasks, steps=5, optimizer=opt, **kw)
    ck = tmp_path / "c.safetensors"
    first = meta_train_resumable(prob, model, tasks, ck, steps=3, every=2, optimizer=opt, **kw)
    st = load_train_state(prob, ck)
    assert st is not None and st.step == 3 and st.optimizer == opt
    if opt != "newton":
        assert "generator" in st.tensors
    out = meta_train_resumable(prob, model, tasks, ck, steps=5, every=2, optimizer=opt, **kw)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert any(not torch.equal(first[k], ref[k]) for k in ref)


def test_restart_without_state_would_differ(tmp_path):
    """Guards the test above: restarting Adam from λ alone does not reproduce the run."""
    model, prob, tasks, kw = _tiny("adam")
    ref = mf.train.meta_train(prob, model, tasks, steps=5, **kw)
    half = mf.train.meta_train(prob, model, tasks, steps=3, **kw)
    naive = mf.train.meta_train(prob, model, tasks, steps=2, init=half, **kw)
    assert any(not torch.equal(naive[k], ref[k]) for k in ref)


def test_corrupt_checkpoint_is_reported_not_used(tmp_path):
    model, prob, tasks, kw = _tiny("adam")
    ck = tmp_path / "c.safetensors"
    meta_train_resumable(prob, model, tasks, ck, steps=2, every=1, **kw)
    blob = bytearray(ck.read_bytes())
    blob[-3] ^= 0x10  # inside the tensor data
    ck.write_bytes(bytes(blob))
    with pytest.raises(CheckpointCorruptError, match="c.safetensors.*not used"):
        meta_train_resumable(prob, model, tasks, ck, steps=4, every=1, **kw)
    ck.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated
    with pytest.raises(CheckpointCorruptError, match="truncated|unreadable"):
        load_checkpoint(ck)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model, prob, tasks, kw = _tiny("adam")
    ck = tmp_path / "c.safetensors"
    meta_train_resumable(prob, model, tasks, ck, steps=2, every=1, **kw)
    with pytest.raises(ValueError, match="outer_lr"):
        meta_train_resumable(prob, model, tasks, ck, steps=4, **dict(kw, outer_lr=0.1))
    with pytest.raises(ValueError, match="tasks"):
        meta_train_resumable(prob, model, tasks[:-1], ck, steps=4, **kw)
    plain = tmp_path / "p.safetensors"
    save_checkpoint(plain, prob.init_params(), {"step": 1})
    with pytest.raises(ValueError, match="no training state"):
        meta_train_resumable(prob, model, tasks, plain, steps=4, **kw)
    # optimizer/generator tensors stay out of the user-facing parameter dict
    params, meta = load_checkpoint(ck)
    assert set(params) == set(prob.init_params()) and set(meta) == {"step", "F"}
    assert any(k.startswith("__mf_state__/") for k in load_tensors(ck)[0])


def test_checkpoint_binds_the_problem_and_streamed_task_ids(tmp_path):
    """The file carries the identity of what produced it: the problem (model, loss, inner map,
    damping) and, for a streamed source, its task ids."""
    model, prob, tasks, kw = _tiny("adam")
    ck = tmp_path / "c.safetensors"
    meta_train_resumable(prob, model, tasks, ck, steps=2, every=1, **kw)
    other = mf.MetaProblem(model, inner=prob.inner, damping=prob.damping + 0.5)
    with pytest.raises(ValueError, match=f"{ck.name}.*differing: problem"):
        meta_train_resumable(other, model, tasks, ck, steps=4, every=1, **kw)
    src = tmp_path / "s.safetensors"
    meta_train_resumable(prob, model, mf.TaskSource(w.Dataset(tasks)), src, steps=2, **kw)
    renamed = [mf.Task(support=t.support, query=t.query, id=f"x{i}") for i, t in enumerate(tasks)]
    with pytest.raises(ValueError, match="differing: task_ids"):
        meta_train_resumable(prob, model, mf.TaskSource(w.Dataset(renamed)), src, steps=4, **kw)
