"""The in-memory few-shot dataset every loader returns.

A :class:`FewShotDataset` is a labelled image pool plus named splits. ``images`` is a uint8
array ``[N, H, W]`` (grey) or ``[N, H, W, C]`` (colour), or a lazy source that decodes on demand
(large JPEG/PNG sets); ``labels`` is ``int64 [N]`` (class indices into ``class_names``);
``splits`` maps a split name (``"train"``, ``"val"``, ``"test"``) to the sample indices it owns.
A class split (Omniglot alphabets, miniImageNet wnids) owns every sample of its classes; an
instance split (10-class MNIST-style sets) shares classes and divides their samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

SPLITS = ("train", "val", "test")


class DatasetLayoutError(ValueError):
    """A dataset path does not hold the expected layout (the message names the layout)."""


def one_line(e: BaseException) -> str:
    """``Type: message`` on one line (for error messages that wrap a library's exception)."""
    text = " ".join(str(e).split())
    name = type(e).__name__
    return f"{name}: {text}" if text else name


class LazyImages:
    """Images decoded on demand: ``sources[i]`` is a path or encoded bytes.

    ``decode(source) -> uint8 [H, W] or [H, W, C]`` (already resized to a common size).
    """

    def __init__(self, sources: Sequence[Any], decode: Callable[[Any], np.ndarray]) -> None:
        self.sources = list(sources)
        self.decode = decode

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, idx: Any) -> np.ndarray:
        index = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        out = np.stack([self._decode(int(i)) for i in index])
        return out if np.ndim(idx) else out[0]

    def _decode(self, i: int) -> np.ndarray:
        try:
            return self.decode(self.sources[i])
        except Exception as e:  # a corrupt source: name its index (its path is in the message)
            why = str(e) if isinstance(e, DatasetLayoutError) else one_line(e)
            raise DatasetLayoutError(f"image {i} of {len(self)}: {why}") from None

    @property
    def shape(self) -> tuple[int, ...]:
        if not self.sources:
            raise DatasetLayoutError("LazyImages: no images (shape of an empty source list)")
        first = self._decode(0)
        return (len(self.sources), *first.shape)


@dataclass
class FewShotDataset:
    """A labelled image pool with class or instance splits.

    Attributes:
        name: e.g. ``"glyphs"``, ``"omniglot"``.
        images: uint8 ``[N, H, W]`` / ``[N, H, W, C]`` or a :class:`LazyImages`.
        labels: int64 ``[N]``.
        class_names: one name per class index.
        splits: split name → int64 sample indices.
        invert: images are stored ink-dark (Omniglot PNGs); ``tensor`` flips them so ink = 1.
        meta: provenance (source path, layout, groups, licence...).
    """

    name: str
    images: Any
    labels: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray]
    invert: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.splits = {k: np.asarray(v, dtype=np.int64) for k, v in self.splits.items()}
        self._by_class: dict[str, dict[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of :meth:`tensor`'s output."""
        shape = tuple(self.images.shape[1:])
        if len(shape) == 2:
            return (1, int(shape[0]), int(shape[1]))
        return (int(shape[2]), int(shape[0]), int(shape[1]))

    def classes(self, split: str) -> np.ndarray:
        """Sorted class indices present in ``split``."""
        return np.array(sorted(self.by_class(split)), dtype=np.int64)

    def by_class(self, split: str) -> dict[int, np.ndarray]:
        """``{class index: sorted sample indices}`` within ``split``."""
        if split not in self.splits:
            raise ValueError(f"{self.name}: split={split!r}: expected one of {list(self.splits)}")
        if split not in self._by_class:
            idx = np.sort(self.splits[split])
            lab = self.labels[idx]
            order = np.argsort(lab, kind="stable")
            idx, lab = idx[order], lab[order]
            cuts = np.flatnonzero(np.diff(lab)) + 1
            self._by_class[split] = (
                {
                    int(g[0]): s
                    for g, s in zip(np.split(lab, cuts), np.split(idx, cuts), strict=True)
                }
                if len(idx)
                else {}
            )
        return self._by_class[split]

    def tensor(
        self, index: Sequence[int] | np.ndarray, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Images ``[k, C, H, W]`` scaled to [0, 1] (ink = 1 where ``invert``)."""
        arr = np.asarray(self.images[np.asarray(index, dtype=np.int64)])
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype) / 255.0
        if self.invert:
            x = 1.0 - x
        if x.dim() == 3:
            return x.unsqueeze(1)
        return x.permute(0, 3, 1, 2).contiguous()

    def summary(self) -> str:
        parts = [
            f"{k}: {len(self.by_class(k))} classes / {len(v)} images"
            for k, v in self.splits.items()
        ]
        c, h, w = self.image_shape
        return f"{self.name} ({c}×{h}×{w}; " + ", ".join(parts) + ")"

    def __repr__(self) -> str:
        return f"FewShotDataset({self.summary()})"


def class_split(
    labels: np.ndarray, split_classes: dict[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Sample indices of each split from its class list."""
    labels = np.asarray(labels)
    return {
        k: np.flatnonzero(np.isin(labels, np.asarray(list(v), dtype=np.int64)))
        for k, v in split_classes.items()
    }


def random_class_split(
    num_classes: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[int]]:
    """Seeded class split (train/val/test) by ``fractions``."""
    perm = np.random.default_rng(seed).permutation(num_classes)
    n_tr = int(round(fractions[0] * num_classes))
    n_va = int(round(fractions[1] * num_classes))
    return {
        "train": sorted(perm[:n_tr].tolist()),
        "val": sorted(perm[n_tr : n_tr + n_va].tolist()),
        "test": sorted(perm[n_tr + n_va :].tolist()),
    }


def group_split(
    groups: Sequence[str], seed: int, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> dict[str, list[int]]:
    """Split classes by group (alphabet, radical), greedily to the class fractions; seeded."""
    uniq = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(uniq))
    total = len(groups)
    sizes = {g: 0 for g in uniq}
    for g in groups:
        sizes[g] += 1
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    assign: dict[str, str] = {}
    counts = {"val": 0, "test": 0}
    for k in order:
        g = uniq[int(k)]
        for name, frac in (("val", fractions[1]), ("test", fractions[2])):
            if counts[name] < frac * total and counts[name] + sizes[g] <= frac * total * 1.5 + 1:
                assign[g] = name
                counts[name] += sizes[g]
                break
        else:
            assign[g] = "train"
    for i, g in enumerate(groups):
        out[assign[g]].append(i)
    return out


def cache_root() -> Path:
    """``$METAFLUENCE_CACHE`` or ``~/.cache/metafluence``."""
    env = os.environ.get("METAFLUENCE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metafluence"
