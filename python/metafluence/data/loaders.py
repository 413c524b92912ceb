"""Readers for user-supplied few-shot datasets (data.md §2). No download code anywhere.

Every loader validates what it finds and raises :class:`DatasetLayoutError` with a one-line
message naming the layout it expected. ``strict=True`` (the default) also checks the canonical
counts (e.g. Omniglot 1,623 characters × 20 drawings, miniImageNet 100 × 600); ``strict=False``
accepts any consistent subset (useful for trimmed copies and tests).

Pickles are read with a restricted unpickler that only rebuilds numpy arrays, dicts, lists,
strings and numbers: a pickle that asks for anything else is rejected, not executed.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import splits as S
from .checks import (
    as_labels,
    as_uint8_images,
    check_inflation,
    check_npz,
    check_zip,
    declared_nbytes,
)
from .dataset import (
    DatasetLayoutError,
    FewShotDataset,
    LazyImages,
    cache_root,
    class_split,
    group_split,
    random_class_split,
)
from .dataset import one_line as _one_line

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp")

# ---- safe pickles -----------------------------------------------------------------------------

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name} (only numpy arrays, "
            "dicts, lists, strings and numbers are allowed)"
        )


def safe_unpickle(path: str | os.PathLike, encoding: str = "latin1") -> Any:
    """``pickle.load`` restricted to numpy arrays and plain containers.

    Any failure -- a refused class, a truncated or corrupt file, a missing file -- raises
    :class:`DatasetLayoutError` whose one-line message names ``path``."""
    try:
        with open(path, "rb") as fh:
            return _SafeUnpickler(fh, encoding=encoding).load()
    except Exception as e:  # corrupt pickles raise many types (EOFError, IndexError, ...)
        raise DatasetLayoutError(f"{path}: cannot read pickle safely: {_one_line(e)}") from None


# ---- helpers --------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(name: str, path: Path | str | None, expected: str) -> Iterator[None]:
    """Turn any failure while reading ``path`` (truncated / corrupt file, unexpected contents)
    into a one-line :class:`DatasetLayoutError` naming the file and the expected layout."""
    try:
        yield
    except DatasetLayoutError:
        raise
    except Exception as e:
        raise _err(name, path, f"unreadable file ({_one_line(e)})", expected) from None


def _err(name: str, path: Path | str | None, problem: str, expected: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{name}: {problem} at {path}; expected layout: {expected}")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading PNG/JPEG datasets needs Pillow: pip install pillow") from e
    return Image


def _decoder(
    size: int | None, mode: str, container: Path | None = None
) -> Callable[[Any], np.ndarray]:
    """``source (path | bytes) -> uint8 array`` in ``mode`` ("L"/"RGB"), resized to size×size.
    ``container``: the file that holds encoded sources (named in errors).

    16-bit images are rescaled from 0-65535 by :func:`as_uint8_images` (Pillow would clip them
    at 255), with one warning naming the first such file; 32-bit ("I", "F") images are refused.
    """
    warned = False

    def decode(src: Any) -> np.ndarray:
        nonlocal warned
        image_mod = _pil()
        encoded = isinstance(src, (bytes, bytearray, np.ndarray))
        fh = io.BytesIO(bytes(src)) if encoded else src
        name = f"encoded image in {container}" if encoded else str(src)
        try:
            with image_mod.open(fh) as im:
                if im.mode in ("I", "F"):
                    raise DatasetLayoutError(
                        f"{name}: {im.mode}-mode (32-bit) pixels; expected 8- or 16-bit images"
                    )
                if im.mode.startswith("I;16"):
                    with warnings.catch_warnings():
                        if warned:
                            warnings.simplefilter("ignore")
                        (px,) = as_uint8_images([(np.asarray(im), name)], "image", bits=16)
                    warned = True
                    im = image_mod.fromarray(px)
                im = im.convert(mode)  # decodes everything: a truncated file fails here
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), image_mod.Resampling.LANCZOS)
                return np.asarray(im, dtype=np.uint8)
        except DatasetLayoutError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
            where = f"{len(bytes(src))} encoded bytes in {container}" if encoded else str(src)
            raise DatasetLayoutError(f"cannot decode image {where}: {_one_line(e)}") from None

    return decode


def _eager(sources: Sequence[Any], decode: Callable[[Any], np.ndarray]) -> np.ndarray:
    return np.stack([decode(s) for s in sources]) if sources else np.zeros((0, 1, 1), np.uint8)


def _images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---- Omniglot -------------------------------------------------------------------------------

OMNIGLOT_LAYOUT = (
    "<root>/images_background/<alphabet>/<characterNN>/*.png and <root>/images_evaluation/... "
    "(or images_*.zip, torchvision's <root>/omniglot-py/, MAML's omniglot_resized/<alphabet>/"
    "<character>/*.png); 1,623 characters x 20 drawings"
)


def _extract_zip(z: Path, part: str, out: Path) -> None:
    """Extract ``z`` into a temporary folder next to ``out`` and rename it into place, so a
    failed or interrupted extraction never leaves an ``out`` that looks complete."""
    tmp = out.parent / f".{part}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _reading("omniglot", z, OMNIGLOT_LAYOUT), zipfile.ZipFile(z) as zf:
            check_zip(zf, z, "omniglot")
            zf.extractall(tmp)
        inner = tmp / part if (tmp / part).is_dir() else tmp
        os.replace(inner, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _omniglot_trees(root: Path, extract_to: Path) -> list[tuple[str, Path]]:
    for cand in (root, root / "omniglot-py", root / "omniglot"):
        found = []
        for part in ("images_background", "images_evaluation"):
            d, z = cand / part, cand / f"{part}.zip"
            if d.is_dir():
                found.append((part, d))
            elif z.is_file():
                out = extract_to / part
                if not out.is_dir():
                    _extract_zip(z, part, out)
                found.append((part, out))
        if found:
            return found
    # MAML's omniglot_resized (or any <alphabet>/<character>/*.png tree)
    alph = _subdirs(root) if root.is_dir() else []
    if alph and all(_subdirs(a) for a in alph[:3]):
        return [("omniglot_resized", root)]
    return []


def load_omniglot(
    path: str | os.PathLike,
    size: int = 28,
    split: str = "vinyals",
    seed: int = 0,
    strict: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FewShotDataset:
    """Omniglot (Lake et al. 2015): one class per character, images resized to ``size``.

    ``split``: ``"vinyals"`` (by alphabet, torchmeta's lists), ``"lake"`` (background = train,
    evaluation = test, val = 5 background alphabets) or ``"random"`` (seeded 1100/100/423-style
    class fractions). Ink is 1 after :meth:`FewShotDataset.tensor`.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise _err("omniglot", root, "path does not exist", OMNIGLOT_LAYOUT)
    extract = Path(cache_dir) if cache_dir else cache_root() / "omniglot"
    extract.mkdir(parents=True, exist_ok=True)
    trees = _omniglot_trees(root, extract)
    if not trees:
        raise _err(
            "omniglot", root, "no images_background/images_evaluation found", OMNIGLOT_LAYOUT
        )
    names, alphabets, parts, files = [], [], [], []
    for part, tree in trees:
        for a in _subdirs(tree):
            for c in _subdirs(a):
                imgs = _images(c)
                if not imgs:
                    raise _err("omniglot", c, "character folder without PNGs", OMNIGLOT_LAYOUT)
                if strict and len(imgs) != 20:
                    raise _err("omniglot", c, f"{len(imgs)} drawings, not 20", OMNIGLOT_LAYOUT)
                names.append(f"{a.name}/{c.name}")
                alphabets.append(a.name)
                parts.append(part)
                files.append(imgs)
    if len(names) < 2:
        raise _err("omniglot", root, f"{len(names)} character folders", OMNIGLOT_LAYOUT)
    n_bg = sum(p == "images_background" for p in parts)
    n_ev = sum(p == "images_evaluation" for p in parts)
    if strict and not (
        (n_bg, n_ev) in ((964, 659), (964, 0), (0, 659))
        or (n_bg == n_ev == 0 and len(names) == 1623)
    ):
        raise _err(
            "omniglot",
            root,
            f"{n_bg} background + {n_ev} evaluation + "
            f"{len(names) - n_bg - n_ev} other characters (strict=False accepts a subset)",
            OMNIGLOT_LAYOUT,
        )
    labels = np.concatenate([np.full(len(f), i) for i, f in enumerate(files)])
    flat = [p for f in files for p in f]
    images = _eager(flat, _decoder(size, "L"))
    if split == "vinyals":
        val_a, test_a = set(S.OMNIGLOT_VINYALS["val"]), set(S.OMNIGLOT_VINYALS["test"])
        sc = {
            "train": [i for i, a in enumerate(alphabets) if a not in val_a | test_a],
            "val": [i for i, a in enumerate(alphabets) if a in val_a],
            "test": [i for i, a in enumerate(alphabets) if a in test_a],
        }
        if not sc["val"] or not sc["test"]:  # a subset without the Vinyals alphabets
            sc = group_split(alphabets, seed)
    elif split == "lake":
        bg = sorted({a for a, p in zip(alphabets, parts, strict=True) if p != "images_evaluation"})
        val_a = set(bg[-5:])
        sc = {
            "train": [
                i
                for i, (a, p) in enumerate(zip(alphabets, parts, strict=True))
                if p != "images_evaluation" and a not in val_a
            ],
            "val": [i for i, a in enumerate(alphabets) if a in val_a],
            "test": [i for i, p in enumerate(parts) if p == "images_evaluation"],
        }
    elif split == "random":
        sc = random_class_split(len(names), (1100 / 1623, 100 / 1623, 423 / 1623), seed)
    else:
        raise ValueError(f"omniglot split={split!r}: expected 'vinyals', 'lake' or 'random'")
    return FewShotDataset(
        "omniglot",
        images,
        labels,
        names,
        class_split(labels, sc),
        invert=True,
        meta={"path": str(root), "layout": [p for p, _ in trees], "groups": alphabets},
    )


# ---- miniImageNet -----------------------------------------------------------------------------

MINI_LAYOUT = (
    "<root>/mini-imagenet-cache-{train,val|validation,test}.pkl, or <root>/{train,val,test}.csv + "
    "<root>/images/*.jpg, or <root>/{train,val,test}/<wnid>/*.jpg; 64/16/20 classes x 600 images"
)


def _split_file(root: Path, stem: str, split: str, ext: str) -> Path | None:
    names = [split] + (["validation"] if split == "val" else [])
    for n in names:
        p = root / f"{stem}{n}{ext}"
        if p.is_file():
            return p
    return None


def load_mini_imagenet(
    path: str | os.PathLike, size: int = 84, strict: bool = True
) -> FewShotDataset:
    """miniImageNet (Ravi & Larochelle split) from the pickle cache, CSV + images or folders."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise _err("mini-imagenet", root, "not a directory", MINI_LAYOUT)
    pkl = {
        s: _split_file(root, "mini-imagenet-cache-", s, ".pkl") for s in ("train", "val", "test")
    }
    per_split: dict[str, tuple[Any, list[str], np.ndarray]] = {}
    if all(pkl.values()):
        pkl_files = {s: p for s, p in pkl.items() if p is not None}
        for s, p in pkl_files.items():
            d = safe_unpickle(p)
            if not isinstance(d, dict) or "image_data" not in d or "class_dict" not in d:
                raise _err("mini-imagenet", p, "pickle lacks image_data/class_dict", MINI_LAYOUT)
            with _reading("mini-imagenet", p, MINI_LAYOUT):
                data = np.asarray(d["image_data"])
                wnids = list(d["class_dict"])
                lab = np.full(len(data), -1, dtype=np.int64)
                for i, w in enumerate(wnids):
                    members = as_labels(
                        d["class_dict"][w], p, "mini-imagenet", f"class_dict[{w!r}]"
                    )
                    lab[members] = i
            if (lab < 0).any():
                raise _err("mini-imagenet", p, "rows not covered by class_dict", MINI_LAYOUT)
            per_split[s] = (data, wnids, lab)
        pixels = as_uint8_images(
            [(per_split[s][0], f) for s, f in pkl_files.items()], "mini-imagenet"
        )
        for s, data in zip(list(per_split), pixels, strict=True):
            per_split[s] = (data, *per_split[s][1:])
        layout = "pickle"
    elif (
        all((root / f"{s}.csv").is_file() for s in ("train", "val", "test"))
        and (root / "images").is_dir()
    ):
        dec = _decoder(size, "RGB")
        for s in ("train", "val", "test"):
            rows = (root / f"{s}.csv").read_text().split()
            if not rows or rows[0].replace(" ", "") != "filename,label":
                raise _err(
                    "mini-imagenet", root / f"{s}.csv", "missing header filename,label", MINI_LAYOUT
                )
            pairs = [r.split(",") for r in rows[1:]]
            bad = [i for i, pr in enumerate(pairs) if len(pr) != 2 or not all(pr)]
            if bad:
                raise _err(
                    "mini-imagenet",
                    root / f"{s}.csv",
                    f"line {bad[0] + 2} is not 'filename,label'",
                    MINI_LAYOUT,
                )
            wnids = sorted({lab for _, lab in pairs})
            lab = np.array([wnids.index(lab_) for _, lab_ in pairs], dtype=np.int64)
            files = [root / "images" / f for f, _ in pairs]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise _err(
                    "mini-imagenet",
                    missing[0],
                    f"{len(missing)} listed images missing",
                    MINI_LAYOUT,
                )
            per_split[s] = (LazyImages(files, dec), wnids, lab)
        layout = "csv"
    elif all((root / s).is_dir() for s in ("train", "test")) and (
        (root / "val").is_dir() or (root / "validation").is_dir()
    ):
        dec = _decoder(size, "RGB")
        for s in ("train", "val", "test"):
            d = root / s if (root / s).is_dir() else root / "validation"
            classes = _subdirs(d)
            files, lab = [], []
            for i, c in enumerate(classes):
                imgs = _images(c)
                files += imgs
                lab += [i] * len(imgs)
            per_split[s] = (LazyImages(files, dec), [c.name for c in classes], np.array(lab))
        layout = "folders"
    else:
        raise _err(
            "mini-imagenet", root, "no pickle cache, CSV split or split folders", MINI_LAYOUT
        )
    expect = {"train": 64, "val": 16, "test": 20}
    for s, (_data, wnids, lab) in per_split.items():
        counts = np.bincount(lab, minlength=len(wnids)) if len(lab) else np.zeros(0)
        if len(wnids) == 0 or (counts == 0).any():
            raise _err("mini-imagenet", root, f"split {s} has an empty class", MINI_LAYOUT)
        if strict and (len(wnids) != expect[s] or (counts != 600).any()):
            raise _err(
                "mini-imagenet",
                root,
                f"split {s} has {len(wnids)} classes with "
                f"{int(counts.min())}-{int(counts.max())} images",
                MINI_LAYOUT,
            )

    if strict and any(set(per_split[s][1]) != set(S.MINI_IMAGENET[s]) for s in per_split):
        warnings.warn(
            "mini-imagenet: wnids differ from the Ravi & Larochelle split (this copy may "
            "use the original Vinyals split)",
            UserWarning,
            stacklevel=2,
        )
    return _concat_splits("mini-imagenet", per_split, {"path": str(root), "layout": layout})


def _concat_splits(
    name: str,
    per_split: dict[str, tuple[Any, list[str], np.ndarray]],
    meta: dict[str, Any],
    invert: bool = False,
) -> FewShotDataset:
    class_names: list[str] = []
    labels, parts, splits = [], [], {}
    start = 0
    for s, (data, names, lab) in per_split.items():
        offset = len(class_names)
        class_names += list(names)
        labels.append(np.asarray(lab, dtype=np.int64) + offset)
        parts.append(data)
        splits[s] = np.arange(start, start + len(lab))
        start += len(lab)
    if all(isinstance(p, np.ndarray) for p in parts):
        images: Any = np.concatenate(parts)
    else:
        srcs, decs = [], []
        for p in parts:
            if isinstance(p, LazyImages):
                srcs += [(p.decode, s) for s in p.sources]
            else:
                srcs += [(None, a) for a in p]
            decs.append(p)
        images = LazyImages(srcs, lambda ds: ds[1] if ds[0] is None else ds[0](ds[1]))
    return FewShotDataset(name, images, np.concatenate(labels), class_names, splits, invert, meta)


# ---- tieredImageNet -------------------------------------------------------------------------

TIERED_LAYOUT = (
    "<root>[/tiered-imagenet]/{train,val,test}_images_png.pkl (or {split}_images.npz) + "
    "{split}_labels.pkl; 351/97/160 classes"
)


def load_tiered_imagenet(
    path: str | os.PathLike, size: int = 84, strict: bool = True
) -> FewShotDataset:
    """tieredImageNet (Ren et al. 2018): PNG-bytes pickles (decoded on demand) or decoded npz."""
    root = Path(path).expanduser()
    if (root / "tiered-imagenet").is_dir():
        root = root / "tiered-imagenet"
    if not root.is_dir():
        raise _err("tiered-imagenet", root, "not a directory", TIERED_LAYOUT)
    per_split: dict[str, tuple[Any, list[str], np.ndarray]] = {}
    npz_of: dict[str, Path] = {}  # the splits stored as decoded arrays, and their files
    expect = {"train": 351, "val": 97, "test": 160}
    for s in ("train", "val", "test"):
        lab_p = _split_file(root, "", s, "_labels.pkl")
        png_p = _split_file(root, "", s, "_images_png.pkl")
        npz_p = _split_file(root, "", s, "_images.npz")
        if lab_p is None or (png_p is None and npz_p is None):
            raise _err("tiered-imagenet", root, f"missing {s} images or labels", TIERED_LAYOUT)
        meta = safe_unpickle(lab_p)
        if not isinstance(meta, dict) or "label_specific" not in meta:
            raise _err(
                "tiered-imagenet", lab_p, "labels pickle lacks label_specific", TIERED_LAYOUT
            )
        lab = as_labels(meta["label_specific"], lab_p, "tiered-imagenet", "label_specific")
        if len(lab) == 0:
            raise _err("tiered-imagenet", lab_p, "no labels", TIERED_LAYOUT)
        uniq = np.unique(lab)
        names = list(meta.get("label_specific_str", [str(u) for u in uniq]))
        if len(names) < int(uniq.max()) + 1:
            names = [str(u) for u in range(int(uniq.max()) + 1)]
        if npz_p is not None:
            with _reading("tiered-imagenet", npz_p, TIERED_LAYOUT):
                check_npz(npz_p, "tiered-imagenet")
                with np.load(npz_p, allow_pickle=False) as z:
                    key = "images" if "images" in z.files else z.files[0]
                    data: Any = np.asarray(z[key])
            npz_of[s] = npz_p
        else:
            raw = safe_unpickle(png_p, encoding="bytes")  # type: ignore[arg-type]
            data = LazyImages(list(raw), _decoder(size, "RGB", png_p))
        if len(data) != len(lab):
            raise _err(
                "tiered-imagenet",
                root,
                f"{s}: {len(data)} images, {len(lab)} labels",
                TIERED_LAYOUT,
            )
        if strict and len(uniq) != expect[s]:
            raise _err("tiered-imagenet", root, f"{s} has {len(uniq)} classes", TIERED_LAYOUT)
        per_split[s] = (data, [str(n) for n in names], lab)
    pixels = as_uint8_images([(per_split[s][0], f) for s, f in npz_of.items()], "tiered-imagenet")
    for s, data in zip(list(npz_of), pixels, strict=True):
        per_split[s] = (data, *per_split[s][1:])
    return _concat_splits("tiered-imagenet", per_split, {"path": str(root)})


# ---- CIFAR-FS / FC100 ---------------------------------------------------------------------------

CIFAR_LAYOUT = (
    "<root>[/cifar-100-python]/{train,test,meta} (CIFAR-100 python pickles: data, fine_labels, "
    "coarse_labels; fine_label_names, coarse_label_names), or FC100_{train,val,test}.pickle"
)


def _get(d: dict, key: str) -> Any:
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


def _names(xs: Iterable[Any]) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in xs]


def load_cifar_fewshot(
    path: str | os.PathLike, kind: str = "cifar-fs", strict: bool = True
) -> FewShotDataset:
    """CIFAR-FS (64/16/20 classes) or FC100 (60/20/20 by superclass) from ``cifar-100-python``.

    Train and test are pooled (500 + 100 = 600 images per class), as torchmeta does.
    """
    if kind not in ("cifar-fs", "fc100"):
        raise ValueError(f"kind={kind!r}: expected 'cifar-fs' or 'fc100'")
    root = Path(path).expanduser()
    if (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    if kind == "fc100" and all(
        (root / f"FC100_{s}.pickle").is_file() for s in ("train", "val", "test")
    ):
        per: dict[str, tuple[Any, list[str], np.ndarray]] = {}
        for s in ("train", "val", "test"):
            f = root / f"FC100_{s}.pickle"
            d = safe_unpickle(f)
            with _reading(kind, f, CIFAR_LAYOUT):
                lab = as_labels(_get(d, "labels"), f, kind)
                uniq, inv = np.unique(lab, return_inverse=True)
                per[s] = (np.asarray(_get(d, "data")), [f"fine{u}" for u in uniq], inv)
        pixels = as_uint8_images([(per[s][0], root / f"FC100_{s}.pickle") for s in per], kind)
        for s, data in zip(list(per), pixels, strict=True):
            per[s] = (data, *per[s][1:])
        return _concat_splits("fc100", per, {"path": str(root), "layout": "FC100 pickles"})
    files = {n: root / n for n in ("train", "test", "meta")}
    if not all(f.is_file() for f in files.values()):
        raise _err(kind, root, "missing train/test/meta", CIFAR_LAYOUT)
    meta = safe_unpickle(files["meta"], encoding="bytes")
    parts = [safe_unpickle(files[n], encoding="bytes") for n in ("train", "test")]
    pairs = list(zip(parts, (files["train"], files["test"]), strict=True))
    try:
        fine_names = _names(_get(meta, "fine_label_names"))
        coarse_names = _names(_get(meta, "coarse_label_names"))
        fine = np.concatenate(
            [as_labels(_get(p, "fine_labels"), f, kind, "fine_labels") for p, f in pairs]
        )
        coarse = np.concatenate(
            [as_labels(_get(p, "coarse_labels"), f, kind, "coarse_labels") for p, f in pairs]
        )
        raw = [(np.asarray(_get(p, "data")), f) for p, f in pairs]
    except KeyError as e:
        raise _err(kind, root, f"pickle lacks key {e}", CIFAR_LAYOUT) from None
    except DatasetLayoutError:
        raise
    except (TypeError, ValueError) as e:
        raise _err(
            kind, root, f"unreadable pickle contents ({_one_line(e)})", CIFAR_LAYOUT
        ) from None
    for a, f in raw:
        if a.ndim != 2 or a.shape[1] != 3072:
            raise _err(kind, f, f"data has shape {a.shape}, not [N, 3072]", CIFAR_LAYOUT)
    data = np.concatenate(as_uint8_images(raw, kind))
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    counts = np.bincount(fine, minlength=len(fine_names))
    if strict and (len(fine_names) != 100 or (counts != 600).any()):
        raise _err(
            kind,
            root,
            f"{len(fine_names)} classes with {counts.min()}-{counts.max()} "
            "images (expected 100 x 600)",
            CIFAR_LAYOUT,
        )
    if kind == "cifar-fs":
        name_of = {n: i for i, n in enumerate(fine_names)}
        val = [name_of[n] for n in S.CIFAR_FS["val"] if n in name_of]
        test = [name_of[n] for n in S.CIFAR_FS["test"] if n in name_of]
        sc = {
            "train": sorted(set(range(len(fine_names))) - set(val) - set(test)),
            "val": val,
            "test": test,
        }
    else:
        sup_of = {}
        for f, c in zip(fine, coarse, strict=True):
            sup_of[int(f)] = coarse_names[int(c)]
        sc = {s: sorted(f for f, c in sup_of.items() if c in set(S.FC100[s])) for s in S.FC100}
    return FewShotDataset(
        kind,
        images,
        fine,
        fine_names,
        class_split(fine, sc),
        meta={"path": str(root), "layout": "cifar-100-python"},
    )


# ---- CUB-200-2011 ---------------------------------------------------------------------------

CUB_LAYOUT = (
    "<root>[/CUB_200_2011]/images/<NNN.Class_Name>/*.jpg (+ classes.txt); "
    "200 classes, 11,788 images"
)


def load_cub(path: str | os.PathLike, size: int = 84, strict: bool = True) -> FewShotDataset:
    """CUB-200-2011 with the Chen et al. (2019) 100/50/50 class split (decoded on demand)."""
    root = Path(path).expanduser()
    if (root / "CUB_200_2011").is_dir():
        root = root / "CUB_200_2011"
    img_root = root / "images"
    if not img_root.is_dir():
        raise _err("cub", root, "no images/ folder", CUB_LAYOUT)
    classes = _subdirs(img_root)
    files, lab = [], []
    for i, c in enumerate(classes):
        if not re.match(r"^\d{3}\.", c.name):
            raise _err("cub", c, "class folder not named NNN.Class_Name", CUB_LAYOUT)
        imgs = _images(c)
        if not imgs:
            raise _err("cub", c, "empty class folder", CUB_LAYOUT)
        files += imgs
        lab += [i] * len(imgs)
    if strict and (len(classes) != 200 or len(files) != 11788):
        raise _err("cub", root, f"{len(classes)} classes, {len(files)} images", CUB_LAYOUT)
    idx = range(len(classes))
    sc = {
        "train": [i for i in idx if i % 2 == 0],
        "val": [i for i in idx if i % 4 == 1],
        "test": [i for i in idx if i % 4 == 3],
    }
    labels = np.asarray(lab, dtype=np.int64)
    return FewShotDataset(
        "cub",
        LazyImages(files, _decoder(size, "RGB")),
        labels,
        [c.name for c in classes],
        class_split(labels, sc),
        meta={"path": str(root)},
    )


# ---- IDX / NPZ (MNIST family) -------------------------------------------------------------------

IDX_LAYOUT = (
    "<root>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (MNIST, Fashion-MNIST, KMNIST) or "
    "emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]"
)
NPZ_LAYOUT = (
    "a .npz with x/y or images/labels arrays, kmnist-/k49-{train,test}-{imgs,labels}.npz "
    "(arr_0), or MedMNIST {train,val,test}_{images,labels}"
)


# IDX type byte -> element dtype (big-endian); data.md §2.6 (MNIST uses 0x08)
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_exact(fh: Any, n: int, p: Path, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _err("idx", p, f"truncated {what} ({len(data)} of {n} bytes)", IDX_LAYOUT)
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (optionally gzipped): magic ``0 0 <type> <ndim>``, ``ndim`` big-endian uint32
    dims, then the data (type 0x08 uint8 for MNIST; also int8/int16/int32/float32/float64).

    The size the header declares is computed in exact integers and checked before the data is
    read: against the file size (plain files), against deflate's largest ratio (gzip) and
    against :data:`~metafluence.data.checks.MAX_DECLARED_BYTES`. A gzip is inflated as a stream,
    never past the declared size plus one byte (which, if present, is an error)."""
    p = Path(path)
    gz = p.suffix == ".gz"
    opener: Callable[..., Any] = gzip.open if gz else open
    with _reading("idx", p, IDX_LAYOUT), opener(p, "rb") as fh:
        stored = p.stat().st_size
        magic = fh.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES or not magic[3]:
            raise _err("idx", p, f"not an IDX file (bad magic {magic.hex()!r})", IDX_LAYOUT)
        dtype, ndim = _IDX_TYPES[magic[2]], magic[3]
        dims = struct.unpack(f">{ndim}I", _read_exact(fh, 4 * ndim, p, "header"))
        declared = declared_nbytes(dims, dtype.itemsize, p, "idx")
        if gz:
            check_inflation(declared, stored, p, "idx")
        elif stored != 4 + 4 * ndim + declared:
            raise _err(
                "idx",
                p,
                f"{stored - 4 - 4 * ndim:,} data bytes for shape {dims} of {dtype.name} "
                f"({declared:,} declared)",
                IDX_LAYOUT,
            )
        raw = _read_exact(fh, declared, p, f"data for shape {dims}")
        if gz and fh.read(1):
            raise _err("idx", p, f"more data than shape {dims} declares", IDX_LAYOUT)
    return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(dims)


# one part of an x/y dataset: images, labels and the files (or ``file[key]``) they came from
_XYPart = tuple[np.ndarray, np.ndarray, str, str]


def _xy_dataset(
    name: str, parts: dict[str, _XYPart], meta: dict[str, Any], seed: int
) -> FewShotDataset:
    """Pool ``{part: (x, y, x source, y source)}``, checked (labels by :func:`as_labels`, pixels
    by :func:`as_uint8_images`; errors name the source). ≥ 20 classes: seeded class split
    60/20/20; fewer: instance split (train part → train; test part → split in halves into val
    and test)."""
    ys = []
    for k, (x, y, x_src, y_src) in parts.items():
        lab = as_labels(y, y_src, name)
        if len(x) != len(lab):
            raise DatasetLayoutError(
                f"{name}: {k}: {len(x)} images in {x_src} but {len(lab)} labels in {y_src}"
            )
        if x.ndim not in (3, 4):
            raise DatasetLayoutError(
                f"{name}: {x_src}: images have shape {list(x.shape)}, expected [N, H, W(, C)]"
            )
        ys.append(lab)
    xs = as_uint8_images([(x, x_src) for x, _, x_src, _ in parts.values()], name)
    x, y = np.concatenate(xs), np.concatenate(ys)
    uniq, y = np.unique(y, return_inverse=True)
    names = [str(u) for u in uniq]
    if len(uniq) >= 20:
        splits = class_split(y, random_class_split(len(uniq), seed=seed))
        meta["split"] = "class (seeded 60/20/20)"
    else:
        bounds = np.cumsum([0] + [len(a) for a in ys])
        keys = list(parts)
        rng = np.random.default_rng(seed)
        splits = {}
        for k, a, b in zip(keys, bounds[:-1], bounds[1:], strict=True):
            ids = np.arange(a, b)
            if k in ("train", "val", "test"):
                splits[k] = np.concatenate([splits.get(k, np.zeros(0, np.int64)), ids])
            else:
                splits["train"] = np.concatenate([splits.get("train", np.zeros(0, np.int64)), ids])
        if "val" not in splits and "test" in splits:
            perm = rng.permutation(splits["test"])
            splits["val"], splits["test"] = (
                np.sort(perm[: len(perm) // 2]),
                np.sort(perm[len(perm) // 2 :]),
            )
        if "val" not in splits:
            perm = rng.permutation(splits["train"])
            n = len(perm)
            splits = {
                "train": np.sort(perm[: int(0.6 * n)]),
                "val": np.sort(perm[int(0.6 * n) : int(0.8 * n)]),
                "test": np.sort(perm[int(0.8 * n) :]),
            }
        meta["split"] = "instance (few classes: every split shares the classes)"
    return FewShotDataset(name, x, y, names, splits, meta=meta)


def load_idx(path: str | os.PathLike, seed: int = 0, strict: bool = True) -> FewShotDataset:
    """IDX image/label pairs from a folder (``train``/``t10k`` or EMNIST names)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise _err("idx", root, "not a directory", IDX_LAYOUT)
    found: dict[str, dict[str, Path]] = {}
    emnist = False
    for f in sorted(root.iterdir()):
        m = re.match(
            r"^(?:(emnist-[\w]+-)|(kmnist-)?)(train|t10k|test)-(images-idx3|labels-idx1)-ubyte(\.gz)?$",
            f.name,
        )
        if m:
            emnist |= bool(m.group(1))
            part = "train" if m.group(3) == "train" else "test"
            found.setdefault(part, {})["x" if m.group(4).startswith("images") else "y"] = f
    parts: dict[str, _XYPart] = {}
    for part, d in found.items():
        if set(d) != {"x", "y"}:
            raise _err("idx", root, f"{part} images or labels missing", IDX_LAYOUT)
        x, y = read_idx(d["x"]), read_idx(d["y"])
        if x.ndim != 3:
            raise _err("idx", d["x"], f"images have shape {x.shape}, not [N, H, W]", IDX_LAYOUT)
        parts[part] = (x.transpose(0, 2, 1) if emnist else x, y, str(d["x"]), str(d["y"]))
    if not parts:
        raise _err("idx", root, "no IDX files", IDX_LAYOUT)
    return _xy_dataset("idx", parts, {"path": str(root), "emnist_transposed": emnist}, seed)


def _npz_first(path: Path) -> np.ndarray:
    """The first array of an ``.npz`` (``arr_0``), read fully; errors name the file."""
    with _reading("npz", path, NPZ_LAYOUT):
        check_npz(path, "npz")
        with np.load(path, allow_pickle=False) as z:
            if not z.files:
                raise _err("npz", path, "no arrays", NPZ_LAYOUT)
            return np.asarray(z[z.files[0]])


# the (images, labels) key pairs of a single .npz, in the order they are tried
_NPZ_KEYS = (("x", "y"), ("images", "labels"), ("X", "y"), ("x_train", "y_train"))


def load_npz(path: str | os.PathLike, seed: int = 0, strict: bool = True) -> FewShotDataset:
    """Arrays from ``.npz`` files (KMNIST/K49 pairs, MedMNIST, or x/y, images/labels)."""
    p = Path(path).expanduser()
    parts: dict[str, _XYPart] = {}
    if p.is_dir():
        for part in ("train", "test"):
            xs = sorted(p.glob(f"*-{part}-imgs.npz"))
            ys = sorted(p.glob(f"*-{part}-labels.npz"))
            if xs and ys:
                parts[part] = (_npz_first(xs[0]), _npz_first(ys[0]), str(xs[0]), str(ys[0]))
        if not parts:
            single = sorted(p.glob("*.npz"))
            if len(single) == 1:
                p = single[0]
    if not parts:
        if not p.is_file():
            raise _err("npz", p, "no .npz file", NPZ_LAYOUT)
        keys: dict[str, tuple[str, str]] = {}
        with _reading("npz", p, NPZ_LAYOUT):
            check_npz(p, "npz")
            with np.load(p, allow_pickle=False) as z:
                files = set(z.files)
                if {"train_images", "train_labels"} <= files:
                    keys = {
                        s: (f"{s}_images", f"{s}_labels")
                        for s in ("train", "val", "test")
                        if f"{s}_images" in files
                    }
                else:
                    for xk, yk in _NPZ_KEYS:
                        if {xk, yk} <= files:
                            keys["train"] = (xk, yk)
                            if xk == "x_train" and {"x_test", "y_test"} <= files:
                                keys["test"] = ("x_test", "y_test")
                            break
                for s, (xk, yk) in keys.items():
                    parts[s] = (z[xk], z[yk], f"{p}[{xk}]", f"{p}[{yk}]")
    if not parts:
        raise _err("npz", p, "no image/label arrays", NPZ_LAYOUT)
    return _xy_dataset("npz", parts, {"path": str(p)}, seed)


# ---- ImageFolder ------------------------------------------------------------------------------

FOLDER_LAYOUT = "<root>/<class>/*.{png,jpg} or <root>/{train,val,test}/<class>/*.{png,jpg}"


def load_image_folder(
    path: str | os.PathLike,
    size: int | None = None,
    mode: str = "auto",
    seed: int = 0,
    strict: bool = True,
    eager: bool | None = None,
) -> FewShotDataset:
    """Generic ImageFolder; split folders are respected, else a seeded 60/20/20 class split.

    ``size``: resize to size×size (required when images differ in size). ``mode``: ``"L"``,
    ``"RGB"`` or ``"auto"`` (from the first image). ``eager``: decode all now (default when
    there are ≤ 20,000 images).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise _err("folder", root, "not a directory", FOLDER_LAYOUT)
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "val" not in split_dirs and (root / "validation").is_dir():
        split_dirs["val"] = root / "validation"
    groups = split_dirs if {"train", "test"} <= set(split_dirs) else {"all": root}
    names, files, lab, split_of = [], [], [], []
    for s, d in groups.items():
        for c in _subdirs(d):
            imgs = _images(c)
            if not imgs:
                continue
            names.append(c.name if s == "all" else f"{s}/{c.name}")
            files += imgs
            lab += [len(names) - 1] * len(imgs)
            split_of.append(s)
    if len(names) < 2:
        raise _err("folder", root, f"{len(names)} class folders with images", FOLDER_LAYOUT)
    image_mod = _pil()
    with _reading("folder", files[0], FOLDER_LAYOUT), image_mod.open(files[0]) as im:
        first_mode, first_size = im.mode, im.size
    if mode == "auto":
        mode = "L" if first_mode in ("1", "L", "LA", "I", "I;16") else "RGB"
    dec = _decoder(size, mode)
    labels = np.asarray(lab, dtype=np.int64)
    eager = len(files) <= 20000 if eager is None else eager
    if eager:
        arrs = [dec(f) for f in files]
        if len({a.shape for a in arrs}) > 1:
            raise _err("folder", root, "images differ in size (pass size=...)", FOLDER_LAYOUT)
        images: Any = np.stack(arrs)
    else:
        images = LazyImages(files, dec)
    if "all" in groups:
        sc = random_class_split(len(names), seed=seed)
    else:
        sc = {s: [i for i, g in enumerate(split_of) if g == s] for s in groups}
    meta = {"path": str(root), "first_image": (first_mode, first_size)}
    return FewShotDataset("folder", images, labels, names, class_split(labels, sc), meta=meta)


# ---- registry -------------------------------------------------------------------------------

LOADERS: dict[str, Callable[..., FewShotDataset]] = {
    "omniglot": load_omniglot,
    "mini-imagenet": load_mini_imagenet,
    "tiered-imagenet": load_tiered_imagenet,
    "cifar-fs": lambda path, **kw: load_cifar_fewshot(path, "cifar-fs", **kw),
    "fc100": lambda path, **kw: load_cifar_fewshot(path, "fc100", **kw),
    "cub": load_cub,
    "idx": load_idx,
    "mnist": load_idx,
    "npz": load_npz,
    "folder": load_image_folder,
}
LAYOUTS = {
    "omniglot": OMNIGLOT_LAYOUT,
    "mini-imagenet": MINI_LAYOUT,
    "tiered-imagenet": TIERED_LAYOUT,
    "cifar-fs": CIFAR_LAYOUT,
    "fc100": CIFAR_LAYOUT,
    "cub": CUB_LAYOUT,
    "idx": IDX_LAYOUT,
    "mnist": IDX_LAYOUT,
    "npz": NPZ_LAYOUT,
    "folder": FOLDER_LAYOUT,
}
