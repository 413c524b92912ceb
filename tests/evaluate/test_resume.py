"""Resumable ground-truth retraining: SIGKILL leave_one_out mid-run, rerun, identical Δf,
finished items not retrained; a damaged chunk is reported and recomputed."""

from __future__ import annotations

import signal

import pytest
import torch

import metafluence as mf
from metafluence._store import ProgressStore
from metafluence.evaluate.groups import leave_group_out
from tests import resume_worker as w


def test_kill_and_resume_leave_one_out(tmp_path):
    store_dir = tmp_path / "loo"

    def some_chunk_done():
        return store_dir.is_dir() and any(store_dir.glob("*.safetensors"))

    rc = w.run_and_kill("loo", tmp_path, some_chunk_done, sleep=0.3)
    assert rc == -signal.SIGKILL
    killed_log = w.work_log(tmp_path)
    assert len(killed_log) < 8  # interrupted before the last retrain
    finished = {int(k.split("-")[0]) for k in _chunk_keys(store_dir)}
    assert finished and len(finished) < 8
    (tmp_path / "work.log").unlink()
    resumed = w.loo(tmp_path)
    # exactly the unfinished items were retrained on the rerun
    assert sorted(w.work_log(tmp_path)) == sorted(
        f"item {k}" for k in range(8) if k not in finished
    )
    reference = w.loo(tmp_path / "fresh")
    assert reference.shape == (8,) and torch.equal(resumed, reference)
    assert (reference != 0).all()


def test_damaged_chunk_is_reported_and_recomputed(tmp_path):
    first = w.loo(tmp_path)
    files = sorted((tmp_path / "loo").glob("*.safetensors"))
    assert len(files) == 8
    blob = bytearray(files[2].read_bytes())
    blob[-1] ^= 0x01
    files[2].write_bytes(bytes(blob))
    (tmp_path / "work.log").unlink()
    with pytest.warns(RuntimeWarning, match="corrupt.*not used"):
        again = w.loo(tmp_path)
    assert w.work_log(tmp_path) == ["item 2"]
    assert torch.equal(first, again)
    assert files[2].with_name(files[2].name + ".corrupt").exists()


def test_changed_configuration_is_refused(tmp_path):
    w.loo(tmp_path)
    model, prob = w.problem()
    lam = prob.init_params()
    with pytest.raises(ValueError, match="meta_params"):
        mf.evaluate.leave_one_out(
            prob, lam, w.tasks(8, 0), w.tasks(3, 1), checkpoint_dir=tmp_path / "loo"
        )


def test_leave_group_out_resumes(tmp_path):
    model, prob = w.problem()
    lam = mf.train.meta_train(prob, model, w.tasks(6, 0), steps=3, outer_lr=0.05)
    calls = []
    newton = mf.evaluate.newton_retrain(prob, max_steps=2)

    def retrain(batch, start):
        calls.append(1)
        return newton(batch, start)

    groups = [[0, 1], [2], [3, 4], [5]]
    args = (prob, lam, w.tasks(6, 0), w.tasks(2, 1), groups)
    ref_df, ref_dl = leave_group_out(*args, items="task", retrain=retrain, return_params=True)
    d = tmp_path / "groups"
    df, dl = leave_group_out(
        *args, items="task", retrain=retrain, return_params=True, checkpoint_dir=d, chunk_size=3
    )
    assert torch.equal(df, ref_df) and torch.equal(dl, ref_dl)
    store = ProgressStore(d, _config_of(d))
    assert store.is_complete and len(store.keys()) == 2
    (d / f"{store.keys()[1]}.safetensors").unlink()  # as if killed before the last chunk
    calls.clear()
    df2, dl2 = leave_group_out(
        *args, items="task", retrain=retrain, return_params=True, checkpoint_dir=d, chunk_size=3
    )
    assert len(calls) == 1  # only group 3 (the second chunk) was retrained
    assert torch.equal(df2, ref_df) and torch.equal(dl2, ref_dl)
    # the process-pool path saves and resumes the same way
    (d / f"{store.keys()[0]}.safetensors").unlink()
    kw = dict(items="task", retrain=retrain, return_params=True, checkpoint_dir=d, chunk_size=1)
    with pytest.raises(ValueError, match="chunk_size"):
        leave_group_out(*args, workers=2, **kw)
    df3, dl3 = leave_group_out(*args, workers=2, **dict(kw, chunk_size=3))
    assert torch.equal(df3, ref_df) and torch.equal(dl3, ref_dl)


def _chunk_keys(d):
    return [p.name[: -len(".safetensors")] for p in d.glob("*.safetensors")]


def _config_of(d):
    import json

    return json.loads((d / "manifest.json").read_text())["config"]
