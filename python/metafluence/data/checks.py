"""Value checks shared by every loader: pixels, labels and declared sizes (one home each).

* :func:`as_uint8_images` turns the image arrays of one dataset into uint8 pixels 0-255 -- or
  refuses them -- by dtype and range, never by a silent cast (a cast of floats in [0, 1] gives
  black images; a cast of uint16 wraps modulo 256).
* :func:`as_labels` turns a label array into int64 class indices, refusing what is not a whole
  number (a cast of float labels 0.0, 0.1, ..., 2.9 collapses 30 classes into 3).
* :func:`declared_nbytes`, :func:`check_inflation` and :func:`check_zip` bound what a reader
  decompresses by what the file declares, before it reads.

Every error is a :class:`DatasetLayoutError` (a ``ValueError``) whose one-line message names the
file and what was expected.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DatasetLayoutError

PIXELS = "uint8 0-255, integers 0-65535 (rescaled) or floats in [0, 1] or [0, 255]"
LABELS = "integer class indices >= 0 (whole numbers) in an array [N] or [N, 1]"

# floats a little outside [0, 1] or [0, 255] (resampling overshoot) are clipped, not refused
_UNIT_TOL = 1e-3
_BYTE_TOL = 0.5
MAX_PIXEL_BITS = 16

# a header that declares more than this is refused before anything is read (16 GiB: 20x the
# largest MNIST-family file, EMNIST byclass, uncompressed)
MAX_DECLARED_BYTES = 1 << 34
# deflate (gzip, zip) cannot inflate more than ~1032:1; a larger declared ratio is a lie
MAX_DEFLATE_RATIO = 1032
_DEFLATE_SLACK = 1 << 16


def _range(a: np.ndarray) -> tuple[Any, Any]:
    return a.min(), a.max()


def as_uint8_images(
    arrays: Sequence[tuple[Any, str | Path]], name: str, bits: int | None = None
) -> list[np.ndarray]:
    """The image arrays of one dataset as uint8 pixels 0-255 (same shapes), or an error.

    ``arrays`` holds ``(array, source)`` pairs, ``source`` the file (or ``file[key]``) the array
    came from, named in every error. The arrays are judged together so that one dataset gets one
    conversion:

    * uint8: unchanged; bool: ``False -> 0``, ``True -> 255``;
    * other integers in [0, 255]: cast without loss; up to 16 bits: rescaled by
      ``255 / (2**bits - 1)`` with ``bits`` the smallest bit depth (9-16) that holds the largest
      value of the dataset, with a warning; negative or wider values are refused;
    * floats, all finite: in [0, 1] -> ``round(255 x)``; in [0, 255] -> ``round(x)``; anything
      else (negative, standardised, > 255) is refused;
    * any other dtype (strings, objects, complex) is refused.

    ``bits``: the bit depth the file format declares (16 for a 16-bit PNG): integers are then
    read as ``bits``-bit pixels (rescaled by ``255 / (2**bits - 1)``, with a warning) whatever
    their range.

    Raises:
        DatasetLayoutError: naming the source and the accepted pixel formats (:data:`PIXELS`).
    """
    arrs = [(np.asarray(a), str(src)) for a, src in arrays]
    for a, src in arrs:
        if a.dtype.kind not in "biuf":
            raise DatasetLayoutError(
                f"{name}: {src}: images have dtype {a.dtype}; expected {PIXELS}"
            )
    if all(a.dtype == np.uint8 for a, _ in arrs):
        return [a for a, _ in arrs]
    ints = [(a, src) for a, src in arrs if a.dtype.kind in "iu" and a.dtype != np.uint8 and a.size]
    floats = [(a, src) for a, src in arrs if a.dtype.kind == "f" and a.size]
    int_scale = _int_scale(ints, name, bits)
    float_scale = _float_scale(floats, name)
    out = []
    for a, _ in arrs:
        if a.dtype == np.uint8:
            out.append(a)
        elif a.dtype.kind == "b":
            out.append(a.astype(np.uint8) * np.uint8(255))
        elif a.dtype.kind in "iu":
            if int_scale == 1.0:
                out.append(a.astype(np.uint8))
            else:
                out.append(np.rint(a * int_scale).astype(np.uint8))
        else:
            x = np.rint(a.astype(np.float64) * float_scale)
            out.append(np.clip(x, 0, 255).astype(np.uint8))
    return out


def _int_scale(ints: list[tuple[np.ndarray, str]], name: str, bits: int | None) -> float:
    """1.0 when every value is in [0, 255] (and no ``bits`` is declared); else the rescale
    factor of the declared or smallest 9-16-bit depth (with a warning)."""
    if not ints:
        return 1.0
    top, where = 0, ints[0][1]
    for a, src in ints:
        lo, hi = _range(a)
        if lo < 0:
            raise DatasetLayoutError(
                f"{name}: {src}: {a.dtype} images with negative values (min {int(lo)}); "
                f"expected {PIXELS}"
            )
        if hi > top:
            top, where = int(hi), src
    if bits is None and top <= 255:
        return 1.0
    bits = bits or top.bit_length()
    if top.bit_length() > bits or bits > MAX_PIXEL_BITS:
        raise DatasetLayoutError(
            f"{name}: {where}: images with values up to {top} (more than "
            f"{min(bits, MAX_PIXEL_BITS)} bits); expected {PIXELS}"
        )
    full = (1 << bits) - 1
    dtypes = sorted({str(a.dtype) for a, _ in ints})
    warnings.warn(
        f"{name}: {', '.join(src for _, src in ints)}: {'/'.join(dtypes)} images with values up "
        f"to {top} read as {bits}-bit pixels and rescaled to 0-255 (x 255/{full})",
        UserWarning,
        stacklevel=3,
    )
    return 255.0 / full


def _float_scale(floats: list[tuple[np.ndarray, str]], name: str) -> float:
    """255.0 for floats in [0, 1], 1.0 for floats in [0, 255]; refuses anything else."""
    lo_all, hi_all = math.inf, -math.inf
    for a, src in floats:
        lo, hi = (float(v) for v in _range(a))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DatasetLayoutError(
                f"{name}: {src}: {a.dtype} images hold NaN or infinite values; expected {PIXELS}"
            )
        if lo < -_UNIT_TOL or hi > 255 + _BYTE_TOL:
            raise DatasetLayoutError(
                f"{name}: {src}: {a.dtype} images with values in [{lo:.4g}, {hi:.4g}] "
                f"(standardised or unknown scale); expected {PIXELS}"
            )
        lo_all, hi_all = min(lo_all, lo), max(hi_all, hi)
    if not floats:
        return 1.0
    return 255.0 if hi_all <= 1 + _UNIT_TOL else 1.0


def as_labels(y: Any, source: str | Path, name: str, what: str = "labels") -> np.ndarray:
    """``y`` as int64 class indices ``[N]`` (``[N, 1]`` is flattened), or an error.

    Accepts integer and bool arrays and float arrays whose values are all whole numbers; refuses
    negative values, fractions, NaN/inf, strings and objects, naming ``source`` (the file) and
    ``what`` (e.g. ``"labels"``, ``"class_dict rows"``).

    Raises:
        DatasetLayoutError: naming the source and what was expected (:data:`LABELS`).
    """
    try:
        a = np.asarray(y)
    except Exception as e:  # ragged lists
        raise DatasetLayoutError(
            f"{name}: {source}: {what} are not an array ({type(e).__name__}); expected {LABELS}"
        ) from None
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise DatasetLayoutError(
            f"{name}: {source}: {what} have shape {list(a.shape)}; expected {LABELS}"
        )
    kind = a.dtype.kind
    if kind not in "biuf":
        example = f" (e.g. {a[0].item()!r})" if a.size else ""
        raise DatasetLayoutError(
            f"{name}: {source}: {what} have dtype {a.dtype}{example}; expected {LABELS}"
        )
    if kind == "b" or a.size == 0:
        return a.astype(np.int64)
    if kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            raise DatasetLayoutError(
                f"{name}: {source}: {what} hold {a[i].item()} at row {i}; expected {LABELS}"
            )
        frac = a != np.floor(a)
        if frac.any():
            i = int(np.flatnonzero(frac)[0])
            raise DatasetLayoutError(
                f"{name}: {source}: {what} are {a.dtype} with fractional values "
                f"(e.g. {a[i].item()!r} at row {i}); expected {LABELS}"
            )
    lo, hi = _range(a)
    if lo < 0:
        i = int(np.argmin(a))
        raise DatasetLayoutError(
            f"{name}: {source}: {what} hold {a[i].item()!r} at row {i}; expected {LABELS}"
        )
    if hi > np.iinfo(np.int64).max or (kind == "f" and hi > 2**53):
        raise DatasetLayoutError(
            f"{name}: {source}: {what} hold {hi.item()!r}, too large for a class index; "
            f"expected {LABELS}"
        )
    return a.astype(np.int64)


def declared_nbytes(dims: Sequence[int], itemsize: int, source: str | Path, name: str) -> int:
    """``prod(dims) * itemsize`` in exact integers, refused above :data:`MAX_DECLARED_BYTES`
    (a header whose product is absurd, or would overflow int64, is an error, not a read)."""
    total = math.prod(int(d) for d in dims) * int(itemsize)
    if total > MAX_DECLARED_BYTES:
        raise DatasetLayoutError(
            f"{name}: {source}: the header declares shape {tuple(int(d) for d in dims)} "
            f"({total:,} bytes), more than the {MAX_DECLARED_BYTES:,} bytes accepted"
        )
    return total


def check_inflation(declared: int, stored: int, source: str | Path, name: str) -> None:
    """Refuse a compressed member that declares more than deflate can produce from ``stored``
    bytes (so a forged header cannot make a reader inflate or allocate without bound)."""
    if declared > MAX_DEFLATE_RATIO * stored + _DEFLATE_SLACK:
        raise DatasetLayoutError(
            f"{name}: {source}: declares {declared:,} bytes from {stored:,} compressed bytes "
            f"(more than deflate's {MAX_DEFLATE_RATIO}:1); the file is corrupt or forged"
        )


def check_zip(zf: zipfile.ZipFile, source: str | Path, name: str) -> None:
    """Check every member of an open zip (``.npz``, a dataset ``.zip``) before extracting it:
    declared sizes within :data:`MAX_DECLARED_BYTES` in all and within deflate's ratio of their
    compressed size. ``zipfile`` then never inflates a member past its declared size."""
    total = 0
    for info in zf.infolist():
        where = f"{source}[{info.filename}]"
        if info.compress_type != zipfile.ZIP_STORED:
            check_inflation(info.file_size, info.compress_size, where, name)
        total += info.file_size
    if total > MAX_DECLARED_BYTES:
        raise DatasetLayoutError(
            f"{name}: {source}: members declare {total:,} bytes in all, more than the "
            f"{MAX_DECLARED_BYTES:,} bytes accepted"
        )


def check_npz(path: str | Path, name: str) -> None:
    """Check an ``.npz`` before ``np.load`` reads it: the zip members (:func:`check_zip`) and,
    for each ``.npy`` member, that the shape its header declares fits in the member (``np.load``
    allocates the declared shape before it reads)."""
    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as zf:
        check_zip(zf, path, name)
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            where = f"{path}[{info.filename[:-4]}]"
            with zf.open(info) as fh:
                version = npy.read_magic(fh)
                read_header = (
                    npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                )
                shape, _, dtype = read_header(fh)
            nbytes = declared_nbytes(shape, dtype.itemsize, where, name)
            if nbytes > info.file_size:
                raise DatasetLayoutError(
                    f"{name}: {where}: the header declares shape {tuple(shape)} of {dtype} "
                    f"({nbytes:,} bytes) but the member holds {info.file_size:,} bytes"
                )
