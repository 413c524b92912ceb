"""Loaders never change the data without a word (issue 17): pixel dtypes and ranges, labels,
errors that name the file, and decompression bounded by what a header declares."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import metafluence as mf
from metafluence.data import DatasetLayoutError
from metafluence.data.checks import MAX_DECLARED_BYTES, as_labels, as_uint8_images

N, H = 40, 4  # 40 images of 4x4, 20 classes x 2 (>= 20 classes: a class split)


def _labels(n: int = N) -> np.ndarray:
    return np.arange(n) % (n // 2)


def _npz(path: Path, x, y) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _load_npz(path: Path):
    return mf.data.load(f"npz:{path}")


def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


# ---- pixels --------------------------------------------------------------------------------------


def test_float_unit_range_is_scaled_not_blackened(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((N, H, H)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _load_npz(_npz(tmp_path / "a.npz", x, _labels()))
    np.testing.assert_array_equal(ds.images, np.rint(x.astype(np.float64) * 255).astype(np.uint8))
    assert ds.images.max() > 200  # not all black


def test_float_byte_range_is_rounded(tmp_path):
    x = np.linspace(0, 255, N * H * H).reshape(N, H, H)
    ds = _load_npz(_npz(tmp_path / "a.npz", x, _labels()))
    np.testing.assert_array_equal(ds.images, np.rint(x).astype(np.uint8))


@pytest.mark.parametrize("dtype", [np.int16, np.int64, np.uint16, np.uint32])
def test_wide_integers_in_byte_range_are_lossless(tmp_path, dtype):
    x = (np.arange(N * H * H) % 256).reshape(N, H, H).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _load_npz(_npz(tmp_path / "a.npz", x, _labels()))
    np.testing.assert_array_equal(ds.images, x.astype(np.uint8))


def test_uint16_is_rescaled_with_a_warning_never_wrapped(tmp_path):
    x = np.linspace(0, 65535, N * H * H).astype(np.uint16).reshape(N, H, H)
    with pytest.warns(UserWarning, match=r"a\.npz\[x\].*16-bit.*rescaled"):
        ds = _load_npz(_npz(tmp_path / "a.npz", x, _labels()))
    np.testing.assert_array_equal(ds.images, np.rint(x * (255 / 65535)).astype(np.uint8))
    flat = ds.images.reshape(-1)
    assert (np.diff(flat.astype(int)) >= 0).all()  # order kept: no wrap modulo 256
    # 12-bit data: the smallest depth that holds the largest value
    x12 = np.linspace(0, 4095, N * H * H).astype(np.uint16).reshape(N, H, H)
    with pytest.warns(UserWarning, match="12-bit"):
        ds = _load_npz(_npz(tmp_path / "b.npz", x12, _labels()))
    np.testing.assert_array_equal(ds.images, np.rint(x12 * (255 / 4095)).astype(np.uint8))


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.full((N, H, H), -0.5, np.float32), r"values in \[-0\.5, -0\.5\]"),
        (np.full((N, H, H), 300.0), r"\[300, 300\]"),
        (np.full((N, H, H), np.nan, np.float32), "NaN or infinite"),
        (np.full((N, H, H), -3, np.int16), "negative values"),
        (np.full((N, H, H), 1 << 20, np.int32), "more than 16 bits"),
        (np.full((N, H, H), 1 + 2j), "dtype complex128"),
    ],
)
def test_bad_pixels_are_refused_naming_the_file(tmp_path, x, match):
    f = _npz(tmp_path / "bad.npz", x, _labels())
    with pytest.raises(DatasetLayoutError, match=match) as e:
        _load_npz(f)
    assert f"{f}[x]" in str(e.value) and "\n" not in str(e.value)


def test_one_conversion_per_dataset(tmp_path):
    """Train and test are judged together: a 12-bit test part is not scaled unlike train."""
    km = tmp_path / "km"
    km.mkdir()
    for part, top in (("train", 4095), ("test", 2000)):
        x = np.linspace(0, top, 20 * H * H).astype(np.uint16).reshape(20, H, H)
        np.savez(km / f"kmnist-{part}-imgs.npz", x)
        np.savez(km / f"kmnist-{part}-labels.npz", np.arange(20) % 5)
    with pytest.warns(UserWarning, match="12-bit"):
        ds = mf.data.load(f"npz:{km}")
    assert ds.images[:20].max() == 255 and ds.images[20:].max() == round(2000 * 255 / 4095)


# ---- labels --------------------------------------------------------------------------------------


def test_integral_float_labels_are_accepted(tmp_path):
    ds = _load_npz(_npz(tmp_path / "a.npz", np.zeros((N, H, H), np.uint8), _labels() * 1.0))
    assert ds.num_classes == N // 2


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (_labels() / 10.0, r"fractional values \(e\.g\. 0\.1 at row 1\)"),
        (np.array([f"c{i}" for i in _labels()]), "dtype <U3"),
        (_labels() - 1, "hold -1 at row 0"),
        (np.where(_labels() == 3, np.nan, _labels()), "hold nan at row 3"),
        (np.stack([_labels(), _labels()], 1), r"shape \[40, 2\]"),
    ],
)
def test_bad_labels_are_refused_naming_the_file(tmp_path, y, match):
    f = _npz(tmp_path / "bad.npz", np.zeros((N, H, H), np.uint8), y)
    with pytest.raises(DatasetLayoutError, match=match) as e:
        _load_npz(f)
    assert f"{f}[y]" in str(e.value) and "\n" not in str(e.value)


def test_length_mismatch_names_both_files(tmp_path):
    f = _npz(tmp_path / "a.npz", np.zeros((N, H, H), np.uint8), _labels(N - 2))
    with pytest.raises(DatasetLayoutError, match=r"a\.npz\[x\] but 38 labels in .*a\.npz\[y\]"):
        _load_npz(f)


# ---- pickles: miniImageNet, FC100, CIFAR-100 ---------------------------------------------


def _mini(root: Path, image_data, class_rows=None, per: int = 2) -> None:
    for s in ("train", "val", "test"):
        rows = class_rows or {f"n{s}{i}": list(range(i * per, (i + 1) * per)) for i in range(2)}
        with open(root / f"mini-imagenet-cache-{s}.pkl", "wb") as fh:
            pickle.dump({"image_data": image_data, "class_dict": rows}, fh, protocol=2)


def test_mini_imagenet_float_pickles(tmp_path):
    x = np.random.default_rng(0).random((4, 3, 3, 3)).astype(np.float32)
    _mini(tmp_path, x)
    ds = mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    np.testing.assert_array_equal(ds.images[:4], np.rint(x.astype(np.float64) * 255))
    assert ds.images.dtype == np.uint8
    _mini(tmp_path, x * 255)  # learn2learn's 0-255 floats
    ds = mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    np.testing.assert_array_equal(ds.images[:4], np.rint(x.astype(np.float64) * 255))
    _mini(tmp_path, (x - 0.5) / 0.25)  # standardised: refused
    with pytest.raises(DatasetLayoutError, match="mini-imagenet-cache-train.pkl.*standardised"):
        mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)
    _mini(tmp_path, x, {"n0": [0.0, 1.5], "n1": [2, 3]})
    with pytest.raises(DatasetLayoutError, match=r"train\.pkl: class_dict\['n0'\] are float64"):
        mf.data.load(f"mini-imagenet:{tmp_path}", strict=False)


def test_fc100_and_cifar_labels_and_pixels(tmp_path):
    for s in ("train", "val", "test"):
        d = {"data": np.full((4, 32, 32, 3), 0.5), "labels": np.array(["a", "b", "a", "b"])}
        with open(tmp_path / f"FC100_{s}.pickle", "wb") as fh:
            pickle.dump(d, fh)
    with pytest.raises(DatasetLayoutError, match=r"FC100_train\.pickle: labels have dtype <U1"):
        mf.data.load(f"fc100:{tmp_path}", strict=False)
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for part in ("train", "test"):
        d = {
            b"data": np.full((200, 3072), 65535, np.uint16),
            b"fine_labels": [i % 100 for i in range(200)],
            b"coarse_labels": [(i % 100) % 20 for i in range(200)],
        }
        with open(root / part, "wb") as fh:
            pickle.dump(d, fh)
    with open(root / "meta", "wb") as fh:
        names = {b"fine_label_names": [b"f%d" % i for i in range(100)]}
        pickle.dump({**names, b"coarse_label_names": [b"c%d" % i for i in range(20)]}, fh)
    with pytest.warns(UserWarning, match=r"cifar-100-python/train.*16-bit"):
        ds = mf.data.load(f"cifar-fs:{tmp_path}", strict=False)
    assert (ds.images == 255).all()  # 65535 -> 255, not 65535 % 256 = 255 by luck: check 256
    with open(root / "train", "rb") as fh:
        d = pickle.load(fh)
    d[b"data"][:] = 256
    d[b"fine_labels"] = [i % 100 + 0.5 for i in range(200)]
    with open(root / "train", "wb") as fh:
        pickle.dump(d, fh)
    with pytest.raises(DatasetLayoutError, match=r"cifar-100-python/train: fine_labels"):
        mf.data.load(f"cifar-fs:{tmp_path}", strict=False)


# ---- IDX ---------------------------------------------------------------------------------------


def _idx_bytes(arr: np.ndarray, type_byte: int = 0x08, dims=None) -> bytes:
    dims = arr.shape if dims is None else dims
    head = struct.pack(">BBBB", 0, 0, type_byte, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    return head + arr.tobytes()


def _idx_pair(root: Path, x_bytes: bytes, y: np.ndarray, gz: bool = False) -> tuple[Path, Path]:
    sfx = ".gz" if gz else ""
    fx, fy = root / f"train-images-idx3-ubyte{sfx}", root / f"train-labels-idx1-ubyte{sfx}"
    for f, data in ((fx, x_bytes), (fy, _idx_bytes(y.astype(np.uint8)))):
        f.write_bytes(gzip.compress(data, 1) if gz else data)
    return fx, fy


def test_idx_wider_types(tmp_path):
    x = np.linspace(0, 1, N * H * H).reshape(N, H, H)
    _idx_pair(tmp_path, _idx_bytes(x.astype(">f4"), 0x0D), _labels())
    ds = mf.data.load(f"idx:{tmp_path}")
    np.testing.assert_array_equal(ds.images, np.rint(x.astype(np.float32) * 255.0))
    x16 = np.linspace(0, 65535, N * H * H).astype(">u2").reshape(N, H, H)
    # 0x0B is signed 16-bit: values above 32767 read as negative, refused by name
    _idx_pair(tmp_path, _idx_bytes(x16, 0x0B), _labels())
    with pytest.raises(DatasetLayoutError, match="train-images-idx3-ubyte: int16 images with neg"):
        mf.data.load(f"idx:{tmp_path}")
    x15 = (x16 // 2).astype(">i2")
    _idx_pair(tmp_path, _idx_bytes(x15, 0x0B), _labels())
    with pytest.warns(UserWarning, match="15-bit"):
        ds = mf.data.load(f"idx:{tmp_path}")
    np.testing.assert_array_equal(ds.images, np.rint(x15 * (255 / 32767)).astype(np.uint8))


@pytest.mark.parametrize("gz", [False, True])
def test_idx_absurd_header_refused_before_reading(tmp_path, gz):
    huge = (0xFFFFFFFF,) * 4  # 2**128 bytes: int64 products overflow
    x = np.zeros((N, H, H), np.uint8)
    fx, _ = _idx_pair(tmp_path, _idx_bytes(x, dims=huge), _labels(), gz)
    with pytest.raises(DatasetLayoutError, match="more than the .* bytes accepted") as e:
        mf.data.load(f"idx:{tmp_path}")
    assert str(fx) in str(e.value)
    # a plausible header that the file cannot hold (plain: file size; gzip: deflate ratio)
    fx, _ = _idx_pair(tmp_path, _idx_bytes(x, dims=(10**6, 28, 28)), _labels(), gz)
    with pytest.raises(DatasetLayoutError, match="deflate" if gz else "declared") as e:
        mf.data.load(f"idx:{tmp_path}")
    assert str(fx) in str(e.value)


def test_idx_gzip_bomb_is_not_inflated(tmp_path):
    """A labels file that declares 40 labels but inflates to 200 MB: rejected after reading
    41 bytes of data, in bounded memory and time."""
    x = np.zeros((N, H, H), np.uint8)
    _, fy = _idx_pair(tmp_path, _idx_bytes(x), _labels())
    head = struct.pack(">BBBBI", 0, 0, 8, 1, N)
    bomb = gzip.GzipFile(fileobj=(buf := io.BytesIO()), mode="wb", compresslevel=9)
    bomb.write(head + _labels().astype(np.uint8).tobytes())
    zeros = bytes(1 << 20)
    for _ in range(200):
        bomb.write(zeros)
    bomb.close()
    fy.unlink()
    fy = fy.with_name(fy.name + ".gz")
    fy.write_bytes(buf.getvalue())
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DatasetLayoutError, match="more data than shape") as e:
            mf.data.read_idx(fy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(fy) in str(e.value)
    assert peak < 8 << 20, peak
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00\x08", "bad magic '000008'"),
        (b"\x00\x00\x07\x01" + bytes(8), "bad magic"),
        (b"\x00\x00\x08\x02\x00\x00", r"truncated header \(2 of 8 bytes\)"),
        (struct.pack(">BBBBI", 0, 0, 8, 1, 5) + bytes(3), "3 data bytes for shape"),
        (struct.pack(">BBBBI", 0, 0, 8, 1, 5) + bytes(7), "7 data bytes for shape"),
    ],
)
def test_idx_malformed_names_the_file(tmp_path, data, match):
    f = tmp_path / "x-labels-idx1-ubyte"
    f.write_bytes(data)
    with pytest.raises(DatasetLayoutError, match=match) as e:
        mf.data.read_idx(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


# ---- npz members and zips ----------------------------------------------------------------------


def test_npz_forged_header_refused_before_allocation(tmp_path):
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(
        buf, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    f = tmp_path / "forged.npz"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue() + bytes(64))
        zf.writestr("y.npy", buf.getvalue())
    with pytest.raises(DatasetLayoutError, match=r"forged\.npz\[x\].*more than") as e:
        _load_npz(f)
    assert "\n" not in str(e.value)
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (1000,)})
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue() + bytes(64))
    with pytest.raises(DatasetLayoutError, match=r"8,000 bytes\) but the member holds"):
        _load_npz(f)


def test_zip_member_that_claims_too_much_is_refused(tmp_path):
    from metafluence.data.checks import check_zip

    f = tmp_path / "images_background.zip"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", bytes(1000))
    with zipfile.ZipFile(f) as zf:
        zf.infolist()[0].file_size = MAX_DECLARED_BYTES  # what a forged directory would say
        with pytest.raises(DatasetLayoutError, match=r"images_background\.zip\[a\.png\].*1032"):
            check_zip(zf, f, "omniglot")


# ---- decoded image files ------------------------------------------------------------------------


def test_16bit_png_rescaled_not_clipped(tmp_path):
    image = pytest.importorskip("PIL.Image")
    vals = np.array([[0, 1000, 40000, 65535]] * 4, np.uint16)
    for c in range(2):
        for i in range(2):
            d = tmp_path / f"class{c}"
            d.mkdir(exist_ok=True)
            image.fromarray(vals).save(d / f"{i}.png")
    with pytest.warns(UserWarning, match=r"class0/0\.png.*16-bit"):
        ds = mf.data.load(f"folder:{tmp_path}")
    np.testing.assert_array_equal(ds.images[0, 0], np.rint(vals[0] * (255 / 65535)))


# ---- properties ------------------------------------------------------------------------------

_DTYPES = st.sampled_from(
    ["uint8", "int8", "int16", "uint16", "int32", "int64", "float16", "float32", "float64", "bool"]
)


@st.composite
def _pixel_arrays(draw):
    dtype = np.dtype(draw(_DTYPES))
    shape = (N, H, H)
    if dtype.kind == "f":
        scale = draw(st.sampled_from([1.0, 255.0, 1000.0, -1.0]))
        elems = st.floats(-0.125, 1.125, width=dtype.itemsize * 8) | st.just(float("nan"))
        x = draw(hnp.arrays(dtype, shape, elements=elems)) * dtype.type(scale)
        return x.astype(dtype)
    return draw(hnp.arrays(dtype, shape))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(x=_pixel_arrays())
def test_pixels_property(tmp_path, x):
    """Any dtype/range: either an error naming the file or uint8 pixels that keep the order of
    the input values (no wrap) and, for [0, 1] floats and 0-255 integers, their exact value."""
    f = tmp_path / "p.npz"
    np.savez(f, x=x, y=_labels())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = _load_npz(f)
        except DatasetLayoutError as e:
            assert f"{f}[x]" in str(e) and "\n" not in str(e)
            return
    out = ds.images.reshape(-1).astype(np.int64)
    src = x.reshape(-1).astype(np.float64)
    assert ds.images.dtype == np.uint8 and np.isfinite(src).all() and src.min() >= -1e-3
    order = np.argsort(src, kind="stable")
    assert (np.diff(out[order]) >= 0).all(), "pixel order not kept"
    if x.dtype.kind in "iu" and src.max() <= 255:
        np.testing.assert_array_equal(out, src)
    if x.dtype.kind == "f" and src.max() <= 1:
        assert np.abs(out - 255 * src).max() <= 0.5 + 1e-6


@st.composite
def _label_arrays(draw):
    kind = draw(st.sampled_from(["int", "float_int", "float_frac", "str", "neg"]))
    base = draw(hnp.arrays(np.int64, N, elements=st.integers(0, 30)))
    if kind == "int":
        return base.astype(draw(st.sampled_from(["uint8", "int16", "int64", "uint64"])))
    if kind == "float_int":
        return base.astype(np.float64)
    if kind == "float_frac":
        return base / draw(st.sampled_from([3.0, 10.0, 7.5]))
    if kind == "str":
        return base.astype(str)
    return base - draw(st.integers(1, 5))


@settings(max_examples=60, deadline=None)
@given(y=_label_arrays())
def test_labels_property(y):
    """Either an error naming the source or int64 labels with the same classes as ``y``."""
    try:
        lab = as_labels(y, "src.npz[y]", "npz")
    except DatasetLayoutError as e:
        assert "src.npz[y]" in str(e) and "\n" not in str(e)
        assert y.dtype.kind in "OSU" or (y != np.floor(y)).any() or (y < 0).any()
        return
    assert lab.dtype == np.int64
    np.testing.assert_array_equal(lab, y)  # whole numbers: the same values, the same classes


def test_as_uint8_images_direct():
    (u,) = as_uint8_images([(np.array([[True, False]]), "m")], "t")
    np.testing.assert_array_equal(u, [[255, 0]])
    with pytest.raises(
        DatasetLayoutError, match=r"m: images with values up to 131072 \(more than 16 bits\)"
    ):
        as_uint8_images([(np.array([[1 << 17]], np.int64), "m")], "t", bits=16)
    with pytest.raises(DatasetLayoutError, match="m: images have dtype object"):
        as_uint8_images([(np.array([[None]], object), "m")], "t")
