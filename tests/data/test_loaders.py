"""Every loader on tiny fixture trees built in tmp_path (no real dataset needed)."""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch

import metafluence as mf
from metafluence.data import DatasetLayoutError

PIL = pytest.importorskip("PIL.Image")


def _png(path, size=(12, 12), mode="L", value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    arr = (
        rng.integers(0, 256, size=shape, dtype=np.uint8)
        if value is None
        else np.full(shape, value, np.uint8)
    )
    PIL.fromarray(arr, mode=mode).save(path)


def _omniglot_tree(root, alphabets=("Latin", "Greek", "Korean"), chars=2, draws=3):
    for part in ("images_background", "images_evaluation"):
        for a in alphabets:
            for c in range(1, chars + 1):
                for r in range(1, draws + 1):
                    _png(
                        root
                        / part
                        / f"{part[7:]}_{a}"
                        / f"character{c:02d}"
                        / f"0{c}01_{r:02d}.png",
                        size=(20, 20),
                        value=255 if r % 2 else 0,
                    )


def test_omniglot_tree_zip_and_errors(tmp_path):
    root = tmp_path / "omni"
    _omniglot_tree(root)
    ds = mf.data.load(f"omniglot:{root}", strict=False, size=8, cache_dir=tmp_path / "x")
    assert ds.num_classes == 12 and len(ds) == 36
    assert ds.image_shape == (1, 8, 8)
    x = ds.tensor([0, 1])
    assert x.shape == (2, 1, 8, 8)
    assert float(x[0].max()) == 0.0 and float(x[1].min()) == 1.0  # white → 0 (ink = 1)
    assert sum(len(v) for v in ds.splits.values()) == 36
    with pytest.raises(DatasetLayoutError, match="expected layout"):
        mf.data.load(f"omniglot:{root}")  # strict: 20 drawings expected
    # torchvision root with zips only
    tv = tmp_path / "tv" / "omniglot-py"
    tv.mkdir(parents=True)
    for part in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(tv / f"{part}.zip", "w") as zf:
            for f in sorted((root / part).rglob("*.png")):
                zf.write(f, f.relative_to(root))
    ds2 = mf.data.load(
        f"omniglot:{tmp_path / 'tv'}", strict=False, size=8, cache_dir=tmp_path / "c"
    )
    assert ds2.num_classes == 12
    np.testing.assert_array_equal(ds2.images, ds.images)
    # MAML omniglot_resized
    ds3 = mf.data.load(
        f"omniglot:{root / 'images_background'}",
        strict=False,
        size=8,
        split="random",
        cache_dir=tmp_path / "y",
    )
    assert ds3.num_classes == 6
    with pytest.raises(DatasetLayoutError, match="images_background"):
        mf.data.load(f"omniglot:{tmp_path / 'missing'}")
    with pytest.raises(DatasetLayoutError):
        mf.data.load(f"omniglot:{tmp_path / 'x'}")


def _mini_pickles(root, classes=(3, 2, 2), per=4, val_name="val"):
    rng = np.random.default_rng(0)
    for s, k in zip(("train", val_name, "test"), classes, strict=True):
        data = rng.integers(0, 256, size=(k * per, 6, 6, 3), dtype=np.uint8)
        cd = {f"n{s[:2]}{i:06d}": list(range(i * per, (i + 1) * per)) for i in range(k)}
        with open(root / f"mini-imagenet-cache-{s}.pkl", "wb") as fh:
            pickle.dump({"image_data": data, "class_dict": cd}, fh, protocol=2)


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_mini_imagenet_pickle(tmp_path, val_name):
    _mini_pickles(tmp_path, val_name=val_name)
    ds = mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    assert ds.num_classes == 7 and len(ds) == 28
    assert ds.image_shape == (3, 6, 6)
    assert len(ds.classes("train")) == 3 and len(ds.classes("val")) == 2
    with pytest.raises(DatasetLayoutError, match="64/16/20"):
        mf.data.load(f"mini-imagenet:{tmp_path}")


def test_restricted_unpickler_rejects_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for s in ("train", "val", "test"):
        with open(tmp_path / f"mini-imagenet-cache-{s}.pkl", "wb") as fh:
            pickle.dump({"image_data": Evil(), "class_dict": {}}, fh)
    with pytest.raises(DatasetLayoutError, match="refusing to unpickle builtins.print"):
        mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)


def test_mini_imagenet_csv_and_folders(tmp_path):
    csv = tmp_path / "csv"
    for s, wn in (("train", ["n01", "n02"]), ("val", ["n03", "n04"]), ("test", ["n05", "n06"])):
        rows = ["filename,label"]
        for w in wn:
            for i in range(3):
                f = f"{w}{i:08d}.jpg"
                _png(csv / "images" / f, size=(10, 9), mode="RGB")
                rows.append(f"{f},{w}")
        (csv / f"{s}.csv").write_text("\n".join(rows) + "\n")
    ds = mf.data.load(f"mini-imagenet:{csv}", strict=False, size=8)
    assert ds.num_classes == 6 and ds.image_shape == (3, 8, 8)
    assert ds.tensor([0, 5]).shape == (2, 3, 8, 8)
    fol = tmp_path / "fol"
    for s in ("train", "val", "test"):
        for w in ("a", "b"):
            for i in range(2):
                _png(fol / s / f"n{s}{w}" / f"{i}.jpg", size=(9, 9), mode="RGB")
    ds = mf.data.load(f"mini-imagenet:{fol}", strict=False, size=8)
    assert ds.num_classes == 6 and len(ds) == 12


def test_tiered_imagenet(tmp_path):
    import io

    for s, k in (("train", 3), ("val", 2), ("test", 2)):
        pngs = []
        for i in range(k * 2):
            b = io.BytesIO()
            PIL.fromarray(np.full((5, 5, 3), i * 10, np.uint8)).save(b, format="PNG")
            pngs.append(np.frombuffer(b.getvalue(), np.uint8))
        with open(tmp_path / f"{s}_images_png.pkl", "wb") as fh:
            pickle.dump(pngs, fh)
        lab = {
            "label_specific": np.repeat(np.arange(k), 2),
            "label_general": np.zeros(2 * k),
            "label_specific_str": [f"w{i}" for i in range(k)],
            "label_general_str": ["g"],
        }
        with open(tmp_path / f"{s}_labels.pkl", "wb") as fh:
            pickle.dump(lab, fh)
    ds = mf.data.load(f"tiered-imagenet:{tmp_path}", strict=False, size=5)
    assert ds.num_classes == 7 and len(ds) == 14
    x = ds.tensor([3])
    assert x.shape == (1, 3, 5, 5) and abs(float(x.max()) - 30 / 255) < 1e-6
    with pytest.raises(DatasetLayoutError, match="351/97/160"):
        mf.data.load(f"tiered-imagenet:{tmp_path}")


def _cifar100(root, per=2):
    root.mkdir(parents=True)
    from metafluence.data.splits import CIFAR_FS, FC100

    fine = sorted(set(CIFAR_FS["val"] + CIFAR_FS["test"]) | {f"c{i}" for i in range(64)})[:100]
    coarse = FC100["train"] + FC100["val"] + FC100["test"]
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        n = 100 * per
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [i % 100 for i in range(n)],
            b"coarse_labels": [(i % 100) % 20 for i in range(n)],
            b"filenames": [b"x.png"] * n,
        }
        with open(root / part, "wb") as fh:
            pickle.dump(d, fh)
    with open(root / "meta", "wb") as fh:
        pickle.dump(
            {
                b"fine_label_names": [f.encode() for f in fine],
                b"coarse_label_names": [c.encode() for c in coarse],
            },
            fh,
        )


def test_cifar_fs_and_fc100(tmp_path):
    _cifar100(tmp_path / "cifar-100-python")
    ds = mf.data.load(f"cifar-fs:{tmp_path}", strict=False)
    assert [len(ds.classes(s)) for s in ("train", "val", "test")] == [64, 16, 20]
    assert ds.image_shape == (3, 32, 32) and len(ds) == 400
    fc = mf.data.load(f"fc100:{tmp_path}", strict=False)
    assert [len(fc.classes(s)) for s in ("train", "val", "test")] == [60, 20, 20]
    with pytest.raises(DatasetLayoutError, match="cifar-100-python"):
        mf.data.load(f"cifar-fs:{tmp_path}")  # strict: 600 per class


def test_cub(tmp_path):
    for i in range(8):
        for j in range(2):
            _png(
                tmp_path / "CUB_200_2011" / "images" / f"{i + 1:03d}.Bird_{i}" / f"{j}.jpg",
                size=(11, 7),
                mode="RGB",
            )
    ds = mf.data.load(f"cub:{tmp_path}", strict=False, size=6)
    assert [len(ds.classes(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    assert ds.tensor([0]).shape == (1, 3, 6, 6)
    with pytest.raises(DatasetLayoutError, match="200 classes"):
        mf.data.load(f"cub:{tmp_path}")


def _idx(path, arr, gz):
    magic = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = magic + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx(tmp_path, gz):
    sfx = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    for part, n in (("train", 40), ("t10k", 20)):
        _idx(tmp_path / f"{part}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 5, 5)), gz)
        _idx(tmp_path / f"{part}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, gz)
    ds = mf.data.load(f"idx:{tmp_path}")
    assert ds.num_classes == 10 and len(ds) == 60
    assert len(ds.splits["train"]) == 40 and len(ds.splits["val"]) + len(ds.splits["test"]) == 20
    assert len(ds.classes("train")) == 10  # instance split for few classes
    (tmp_path / f"t10k-labels-idx1-ubyte{sfx}").unlink()
    with pytest.raises(DatasetLayoutError, match="labels-idx1"):
        mf.data.load(f"idx:{tmp_path}")


def test_npz_variants(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "a.npz", x=rng.integers(0, 256, (60, 4, 4), dtype=np.uint8), y=np.arange(60) % 30
    )
    ds = mf.data.load(f"npz:{tmp_path / 'a.npz'}")
    assert ds.num_classes == 30 and sum(len(ds.classes(s)) for s in ds.splits) == 30
    med = tmp_path / "med.npz"
    np.savez(
        med,
        **{
            f"{s}_images": rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
            for s in ("train", "val", "test")
        },
        **{f"{s}_labels": (np.arange(10) % 5)[:, None] for s in ("train", "val", "test")},
    )
    ds = mf.data.load(f"npz:{med}")
    assert ds.image_shape == (3, 4, 4) and len(ds.splits["val"]) == 10
    km = tmp_path / "km"
    km.mkdir()
    for part in ("train", "test"):
        np.savez(km / f"kmnist-{part}-imgs.npz", rng.integers(0, 256, (10, 4, 4), dtype=np.uint8))
        np.savez(km / f"kmnist-{part}-labels.npz", np.arange(10) % 5)
    ds = mf.data.load(f"npz:{km}")
    assert len(ds) == 20
    with pytest.raises(DatasetLayoutError, match="npz"):
        mf.data.load(f"npz:{tmp_path / 'nothing.npz'}")


def test_image_folder_and_registry_errors(tmp_path):
    for c in range(6):
        for i in range(3):
            _png(tmp_path / "f" / f"class{c}" / f"{i}.png", size=(7, 7))
    ds = mf.data.load(f"folder:{tmp_path / 'f'}")
    assert ds.num_classes == 6 and ds.image_shape == (1, 7, 7)
    assert sorted(np.concatenate([ds.classes(s) for s in ds.splits]).tolist()) == list(range(6))
    with pytest.raises(DatasetLayoutError, match="kind one of"):
        mf.data.load("imagenet:/x")
    with pytest.raises(DatasetLayoutError, match="missing path"):
        mf.data.load("omniglot:")
    assert isinstance(DatasetLayoutError("x"), ValueError)
    assert torch.is_tensor(ds.tensor([0]))
