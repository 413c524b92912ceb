"""Episode sampler, label flips, glyph rendering, models and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metafluence as mf
from metafluence.data import FewShotDataset
from tests._close import assert_close_normwise


def _toy(classes=12, per=6, size=5):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (classes * per, size, size), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), per)
    splits = mf.data.dataset.class_split(labels, mf.data.dataset.random_class_split(classes))
    return FewShotDataset("toy", images, labels, [str(i) for i in range(classes)], splits)


def test_sample_tasks_deterministic_and_stable():
    ds = _toy()
    a = mf.data.sample_tasks(ds, ways=3, shots=2, queries=3, num_tasks=6, seed=1)
    b = mf.data.sample_tasks(ds, ways=3, shots=2, queries=3, num_tasks=6, seed=1)
    c = mf.data.sample_tasks(ds, ways=3, shots=2, queries=3, num_tasks=3, seed=1)
    d = mf.data.sample_tasks(ds, ways=3, shots=2, queries=3, num_tasks=6, seed=2)
    for t, u in zip(a, b, strict=True):
        assert t.id == u.id and torch.equal(t.support[0], u.support[0])
        assert torch.equal(t.query[1], u.query[1])
    for t, u in zip(a[:3], c, strict=True):  # stable ids: task i does not depend on num_tasks
        assert torch.equal(t.support[0], u.support[0])
    assert any(not torch.equal(t.support[0], u.support[0]) for t, u in zip(a, d, strict=True))
    t = a[0]
    assert [x.id for x in a] == list(range(6))
    assert t.support[0].shape == (6, 1, 5, 5) and t.query[0].shape == (9, 1, 5, 5)
    assert t.support[1].tolist() == [0, 0, 1, 1, 2, 2] and set(t.query[1].tolist()) == {0, 1, 2}
    train = set(ds.classes("train").tolist())
    for t in a:
        assert set(t.meta["classes"]) <= train and len(set(t.meta["classes"])) == 3
        assert not set(t.meta["support_index"]) & set(t.meta["query_index"])
    with pytest.raises(ValueError, match="classes with at least"):
        mf.data.sample_tasks(ds, ways=5, shots=1, queries=1, split="val")


def test_flip_labels_task_and_point():
    ds = _toy()
    tasks = mf.data.sample_tasks(ds, ways=3, shots=2, queries=2, num_tasks=10, seed=0)
    noisy, mask = mf.data.flip_labels(tasks, fraction=0.3, level="task", seed=0)
    assert mask.dtype == torch.bool and int(mask.sum()) == 3
    for t, n, m in zip(tasks, noisy, mask.tolist(), strict=True):
        assert t.id == n.id and torch.equal(t.query[1], n.query[1])
        if m:
            assert bool((t.support[1] != n.support[1]).all())  # derangement: every label wrong
        else:
            assert n is t
    again, mask2 = mf.data.flip_labels(tasks, fraction=0.3, level="task", seed=0)
    assert torch.equal(mask, mask2)
    noisy, pm = mf.data.flip_labels(tasks, fraction=0.5, level="point", seed=0)
    assert len(pm) == 10 and all(m.shape == (6,) for m in pm)
    for t, n, m in zip(tasks, noisy, pm, strict=True):
        assert torch.equal(t.support[1] != n.support[1], m)
        assert int(n.support[1].max()) < 3
    _, qm = mf.data.flip_labels(tasks, fraction=1.0, level="point", where="query")
    assert all(bool(m.all()) for m in qm)
    with pytest.raises(ValueError, match="level"):
        mf.data.flip_labels(tasks, level="batch")


def test_glyphs_tiny(tmp_path, monkeypatch):
    try:
        mf.data.glyphs.kanjivg_dir()
    except ImportError:
        pytest.skip("kanjivg is not installed")
    monkeypatch.setenv("METAFLUENCE_CACHE", str(tmp_path))
    ds = mf.data.load("glyphs", num_classes=12, samples=4, seed=3)
    assert ds.num_classes == 12 and len(ds) == 48 and ds.image_shape == (1, 28, 28)
    assert ds.images.dtype == np.uint8 and ds.images.max() > 200  # ink rendered
    ink = (ds.images > 128).mean()
    assert 0.03 < ink < 0.5
    assert sum(len(ds.classes(s)) for s in ds.splits) == 12
    groups = ds.meta["groups"]  # no radical group straddles two splits
    for s in ds.splits:
        for t in ds.splits:
            if s < t:
                gs = {groups[c] for c in ds.classes(s)}
                gt = {groups[c] for c in ds.classes(t)}
                assert not gs & gt
    cached = list(tmp_path.glob("glyphs-*.npz"))
    assert len(cached) == 1
    again = mf.data.load("glyphs", num_classes=12, samples=4, seed=3)
    np.testing.assert_array_equal(ds.images, again.images)
    monkeypatch.setenv("METAFLUENCE_CACHE", str(tmp_path / "fresh"))
    rebuilt = mf.data.load("glyphs", num_classes=12, samples=4, seed=3)  # deterministic by seed
    np.testing.assert_array_equal(ds.images, rebuilt.images)


def test_parse_path_commands():
    from metafluence.data.glyphs import parse_path

    segs = parse_path("M10,10c1,0,2,0,3,0s2,0,3,0L20,20")
    assert segs.shape == (3, 4, 2)
    np.testing.assert_allclose(segs[0, 3], [13, 10])
    np.testing.assert_allclose(segs[1, 1], [14, 10])  # reflected control point
    np.testing.assert_allclose(segs[2, 3], [20, 20])


@pytest.mark.parametrize("pool", ["max", "stride"])
@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_conv4_under_vmap(pool, norm):
    from torch.func import functional_call, grad, vmap

    from metafluence.models import Conv4

    torch.manual_seed(0)
    m = Conv4(ways=3, width=4, norm=norm, pool=pool)
    x = torch.rand(2, 4, 1, 28, 28)
    y = torch.randint(0, 3, (2, 4))
    p = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xx, yy):
        return torch.nn.functional.cross_entropy(functional_call(m, p, (xx,)), yy)

    g = vmap(grad(loss), in_dims=(None, 0, 0))(p, x, y)
    g0 = grad(loss)(p, x[0], y[0])
    # norm-wise over all parameters: the conv biases before BatchNorm have a structurally zero
    # gradient, so element-wise both sides are float32 rounding noise that depends on the CPU
    assert_close_normwise({k: v[0] for k, v in g.items()}, g0, rtol=1e-5, what=f"{pool}-{norm}")
    assert "head.weight" in p
    m84 = Conv4(ways=5, in_channels=3, image_size=84, width=4, pool=pool)
    assert m84(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_maxpool2x2_matches_torch():
    from metafluence.models import MaxPool2x2

    x = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(MaxPool2x2()(x), torch.nn.functional.max_pool2d(x, 2))


def test_checkpoint_roundtrip_and_resume(tmp_path):
    from metafluence.models import MLP
    from metafluence.train.checkpoint import (
        default_checkpoint_path,
        load_checkpoint,
        meta_train_resumable,
        save_checkpoint,
    )

    p = {"a": torch.randn(3, 2), "b": torch.arange(4.0)}
    for name in ("x.pt", "x.safetensors"):
        if name.endswith("safetensors"):
            pytest.importorskip("safetensors")
        save_checkpoint(tmp_path / name, p, {"step": 7})
        q, meta = load_checkpoint(tmp_path / name)
        assert meta == {"step": 7} and all(torch.equal(p[k], q[k]) for k in p)
    torch.manual_seed(0)
    model = MLP(4, ways=2, hidden=(3,))
    problem = mf.MetaProblem(model, inner=mf.inner.HeadOnly(head="head", steps=1, lr=0.3))
    tasks = [
        mf.Task(
            (torch.randn(4, 4), torch.tensor([0, 1, 0, 1])),
            (torch.randn(4, 4), torch.tensor([0, 1, 1, 0])),
            id=i,
        )
        for i in range(3)
    ]
    ck = default_checkpoint_path(tmp_path / "run")
    full = mf.train.meta_train(problem, model, tasks, steps=6, outer_lr=0.05, optimizer="sgd")
    half = meta_train_resumable(
        problem, model, tasks, ck, steps=3, every=1, outer_lr=0.05, optimizer="sgd"
    )
    assert load_checkpoint(ck)[1]["step"] == 3
    rest = meta_train_resumable(
        problem, model, tasks, ck, steps=6, every=2, outer_lr=0.05, optimizer="sgd"
    )
    assert load_checkpoint(ck)[1]["step"] == 6
    for k in full:  # full-batch SGD: resuming is exact
        torch.testing.assert_close(full[k], rest[k])
    assert not torch.equal(half["head.weight"], rest["head.weight"])
