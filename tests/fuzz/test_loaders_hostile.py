"""Loaders fed truncated, corrupt and malicious files: each case raises a one-line
:class:`DatasetLayoutError` naming the file (never a crash, a hang or an unrelated exception), a
pickle asking for code is refused by the restricted unpickler (and never runs), and nothing
partial that looks complete is left behind (Omniglot zip extraction, the glyph cache).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import metafluence as mf
from metafluence.data import DatasetLayoutError, safe_unpickle

from ._strategies import FAST, require_kanjivg

PIL = pytest.importorskip("PIL.Image")


def _one_line(err: pytest.ExceptionInfo, *names: object) -> str:
    msg = str(err.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    for n in names:
        assert str(n) in msg, f"{n} not named in: {msg}"
    return msg


def _encoded(fmt: str, size=(16, 16), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    PIL.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def _folder(root, classes=3, per=2, ext=".png", fmt="PNG"):
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            (d / f"{i}{ext}").write_bytes(_encoded(fmt, seed=c * 10 + i))


# ---- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ext, fmt", [(".png", "PNG"), (".jpg", "JPEG")])
@pytest.mark.parametrize("keep", [0, 8, 0.5, -30])
@pytest.mark.parametrize("eager", [True, False])
def test_truncated_image_in_folder(tmp_path, ext, fmt, keep, eager):
    _folder(tmp_path, ext=ext, fmt=fmt)
    bad = tmp_path / "class1" / f"1{ext}"
    raw = bad.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else keep
    bad.write_bytes(raw[:cut])
    with pytest.raises(DatasetLayoutError) as err:
        ds = mf.data.load(f"folder:{tmp_path}", eager=eager, size=16, mode="RGB")
        ds.tensor(np.arange(len(ds)))  # lazy: the bad image is decoded here
    _one_line(err, bad)


def test_garbage_first_image(tmp_path):
    """The first image is opened to sniff its mode: garbage there is named too."""
    _folder(tmp_path)
    bad = tmp_path / "class0" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"folder:{tmp_path}")
    _one_line(err, bad)


def test_corrupt_png_bytes_in_tiered_pickle(tmp_path):
    """tieredImageNet stores PNG bytes; a corrupt entry is reported with its index on access."""
    good = np.frombuffer(_encoded("PNG", size=(5, 5)), np.uint8)
    for s in ("train", "val", "test"):
        pngs = [good, good[: len(good) // 2]]
        with open(tmp_path / f"{s}_images_png.pkl", "wb") as fh:
            pickle.dump(pngs, fh)
        with open(tmp_path / f"{s}_labels.pkl", "wb") as fh:
            pickle.dump({"label_specific": np.array([0, 1])}, fh)
    ds = mf.data.load(f"tiered-imagenet:{tmp_path}", strict=False, size=5)
    ds.tensor([0])
    with pytest.raises(DatasetLayoutError) as err:
        ds.tensor([1])
    _one_line(err, "image 1 of 6", "cannot decode image")


def test_empty_and_wrong_layouts(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"folder:{tmp_path}")  # class dirs without images
    _one_line(err, "0 class folders with images", tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    for kind in ("folder", "mini-imagenet", "idx", "tiered-imagenet", "omniglot", "cub"):
        with pytest.raises(DatasetLayoutError) as err:
            mf.data.load(f"{kind}:{f}")
        _one_line(err, kind)
    # CUB with an empty class folder
    cub = tmp_path / "cub" / "images"
    (cub / "001.A").mkdir(parents=True)
    (cub / "001.A" / "x.jpg").write_bytes(_encoded("JPEG"))
    (cub / "002.B").mkdir()
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"cub:{tmp_path / 'cub'}", strict=False)
    _one_line(err, "empty class folder", "002.B")
    # Omniglot character folder without drawings
    om = tmp_path / "om" / "images_background" / "Latin"
    (om / "character01").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"omniglot:{tmp_path / 'om'}", strict=False, cache_dir=tmp_path / "x")
    _one_line(err, "character folder without PNGs", "character01")


def test_mini_imagenet_bad_csv(tmp_path):
    (tmp_path / "images").mkdir()
    for s in ("train", "val", "test"):
        (tmp_path / f"{s}.csv").write_text("filename,label\na.jpg\n")
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    _one_line(err, "train.csv", "line 2")


# ---- Omniglot zips: corrupt archive, no partial extraction ------------------------------------


def _omniglot_zip(path, chars=2, draws=2):
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(chars):
            for r in range(draws):
                zf.writestr(
                    f"images_background/Latin/character{c:02d}/{c}_{r}.png",
                    _encoded("PNG", size=(8, 8), mode="L", seed=c + r),
                )


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_omniglot_corrupt_zip_leaves_nothing(tmp_path, damage):
    root, cache = tmp_path / "omni", tmp_path / "cache"
    root.mkdir()
    z = root / "images_background.zip"
    _omniglot_zip(z)
    raw = z.read_bytes()
    z.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else os.urandom(len(raw)))
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"omniglot:{root}", strict=False, cache_dir=cache, size=8)
    _one_line(err, z)
    assert not (cache / "images_background").exists(), "a partial extraction looks complete"
    assert not any(p.name.startswith(".images_background.tmp") for p in cache.iterdir())
    # the repaired archive then loads
    _omniglot_zip(z)
    ds = mf.data.load(f"omniglot:{root}", strict=False, cache_dir=cache, size=8, split="random")
    assert ds.num_classes == 2


# ---- pickles ----------------------------------------------------------------------------------


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


class _Plain:
    """An ordinary user class (pickled via copyreg / its module): refused too."""

    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("payload", ["system", "eval", "plain", "nested"])
def test_restricted_unpickler_refuses_objects(tmp_path, protocol, payload):
    marker = tmp_path / "pwned"
    obj = {
        "system": lambda: _System(f"touch {marker}"),
        "eval": _Eval,
        "plain": _Plain,
        "nested": lambda: {"image_data": [np.zeros(2), [_System(f"touch {marker}")]]},
    }[payload]()
    f = tmp_path / "evil.pkl"
    f.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(DatasetLayoutError) as err:
        safe_unpickle(f)
    msg = _one_line(err, f, "refusing to unpickle")
    assert not marker.exists(), "the pickle ran code"
    named = {"system": "system", "nested": "system", "eval": "eval", "plain": "_reconstructor"}
    if not (payload == "plain" and protocol >= 2):  # protocol >= 2 asks for copyreg.__newobj__
        assert f".{named[payload]}" in msg, msg


def test_evil_pickle_through_loaders(tmp_path):
    marker = tmp_path / "pwned"
    for s in ("train", "val", "test"):
        with open(tmp_path / f"{s}_labels.pkl", "wb") as fh:
            pickle.dump({"label_specific": _System(f"touch {marker}")}, fh)
        (tmp_path / f"{s}_images.npz").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match="refusing to unpickle posix.system"):
        mf.data.load(f"tiered-imagenet:{tmp_path}", strict=False)
    cifar = tmp_path / "cifar-100-python"
    cifar.mkdir()
    for n in ("train", "test", "meta"):
        with open(cifar / n, "wb") as fh:
            pickle.dump({b"data": _System(f"touch {marker}")}, fh)
    with pytest.raises(DatasetLayoutError, match="refusing to unpickle"):
        mf.data.load(f"cifar-fs:{tmp_path}", strict=False)
    assert not marker.exists()


def _valid_pickle() -> bytes:
    rng = np.random.default_rng(0)
    obj = {
        "image_data": rng.integers(0, 256, (4, 3, 3, 3), dtype=np.uint8),
        "class_dict": {"n01": [0, 1], "n02": [2, 3]},
        "names": ["a", "b"],
        "scale": 1.5,
    }
    return pickle.dumps(obj, protocol=2)


@FAST
@given(data=st.data())
def test_corrupt_pickles_raise_layout_error(tmp_path_factory, data):
    """Truncations and byte flips of a valid pickle: loaded or DatasetLayoutError, nothing else."""
    raw = bytearray(_valid_pickle())
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    f = tmp_path_factory.mktemp("pkl") / "x.pkl"
    f.write_bytes(bytes(raw))
    try:
        safe_unpickle(f)
    except DatasetLayoutError as e:
        assert str(f) in str(e) and "\n" not in str(e)


def test_truncated_pickle_through_mini_imagenet(tmp_path):
    raw = _valid_pickle()
    for s in ("train", "val", "test"):
        (tmp_path / f"mini-imagenet-cache-{s}.pkl").write_bytes(raw)
    bad = tmp_path / "mini-imagenet-cache-val.pkl"
    bad.write_bytes(raw[:-30])
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    _one_line(err, bad)
    # class_dict pointing outside image_data: named, not an IndexError
    obj = pickle.loads(raw)
    obj["class_dict"]["n02"] = [2, 99]
    bad.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    _one_line(err, bad)


# ---- npz and IDX ------------------------------------------------------------------------------


def _npz_bytes(compressed: bool) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    save = np.savez_compressed if compressed else np.savez
    save(buf, x=rng.integers(0, 256, (30, 4, 4), dtype=np.uint8), y=np.arange(30) % 3)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("damage", ["empty", "half", "tail", "flip", "garbage"])
def test_corrupt_npz(tmp_path, compressed, damage):
    raw = bytearray(_npz_bytes(compressed))
    if damage == "empty":
        raw = bytearray()
    elif damage == "half":
        raw = raw[: len(raw) // 2]
    elif damage == "tail":
        raw = raw[:-10]
    elif damage == "flip":  # inside the first member's data: the zip CRC catches it
        raw[120] ^= 0xFF
    else:
        raw = bytearray(os.urandom(len(raw)))
    f = tmp_path / "d.npz"
    f.write_bytes(bytes(raw))
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"npz:{f}")
    _one_line(err, f)


def test_corrupt_npz_pair_and_object_arrays(tmp_path):
    d = tmp_path / "km"
    d.mkdir()
    np.savez(d / "kmnist-train-imgs.npz", np.zeros((4, 3, 3), np.uint8))
    (d / "kmnist-train-labels.npz").write_bytes(_npz_bytes(False)[:50])
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"npz:{d}")
    _one_line(err, d / "kmnist-train-labels.npz")
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([_Plain()], dtype=object), y=np.zeros(1))
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.load(f"npz:{obj}")
    _one_line(err, obj, "allow_pickle")


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", [0, 3, 6, 17, -1])
def test_truncated_idx(tmp_path, gz, cut):
    raw = _idx_bytes(np.zeros((5, 4, 4)))
    raw = raw[:cut]
    f = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    f.write_bytes(gzip.compress(raw)[: max(len(gzip.compress(raw)) - 4, 0)] if gz else raw)
    with pytest.raises(DatasetLayoutError) as err:
        mf.data.read_idx(f)
    _one_line(err, f)


# ---- the glyph cache ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def glyph_cache(tmp_path_factory):
    require_kanjivg()
    root = tmp_path_factory.mktemp("glyph-cache")
    old = os.environ.get("METAFLUENCE_CACHE")
    os.environ["METAFLUENCE_CACHE"] = str(root)
    try:
        ds = mf.data.load_glyphs(num_classes=3, samples=2)
        yield root, ds
    finally:
        if old is None:
            del os.environ["METAFLUENCE_CACHE"]
        else:
            os.environ["METAFLUENCE_CACHE"] = old


def test_glyph_cache_is_complete_and_atomic(glyph_cache):
    root, ds = glyph_cache
    files = sorted(root.iterdir())
    assert [f.name for f in files] == [os.path.basename(ds.meta["cache"])], "temp file left"
    with np.load(files[0], allow_pickle=False) as z:
        assert z["images"].shape == (3, 2, 28, 28)


@pytest.mark.parametrize("damage", ["truncate", "flip", "wrong_shape", "garbage"])
def test_damaged_glyph_cache_is_rebuilt(glyph_cache, monkeypatch, damage):
    root, ds = glyph_cache
    monkeypatch.setenv("METAFLUENCE_CACHE", str(root))
    path = ds.meta["cache"]
    good = open(path, "rb").read()
    raw = bytearray(good)
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 3] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(os.urandom(len(raw)))
    else:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, images=np.zeros((2, 2, 28, 28), np.uint8), codes=["04e00"] * 2, radicals=["x"] * 2
        )
        raw = bytearray(buf.getvalue())
    with open(path, "wb") as fh:
        fh.write(bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged cache file"):
        again = mf.data.load_glyphs(num_classes=3, samples=2)
    np.testing.assert_array_equal(again.images, ds.images)
    assert open(path, "rb").read() == good, "the rebuilt cache differs from the original"
    assert sorted(p.name for p in root.iterdir()) == [os.path.basename(path)]
