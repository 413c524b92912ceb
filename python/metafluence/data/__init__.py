"""Few-shot data: loaders (no downloads), the embedded glyph default, episodes, label noise.

``load("glyphs")`` builds the embedded KanjiVG glyph dataset; ``load("<kind>:<path>")`` reads a
user-supplied copy, with ``kind`` one of ``omniglot``, ``mini-imagenet``, ``tiered-imagenet``,
``cifar-fs``, ``fc100``, ``cub``, ``idx`` (``mnist``), ``npz``, ``folder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .dataset import SPLITS, DatasetLayoutError, FewShotDataset, LazyImages, cache_root
from .glyphs import load_glyphs
from .loaders import (
    LAYOUTS,
    LOADERS,
    load_cifar_fewshot,
    load_cub,
    load_idx,
    load_image_folder,
    load_mini_imagenet,
    load_npz,
    load_omniglot,
    load_tiered_imagenet,
    read_idx,
    safe_unpickle,
)
from .sampling import flip_labels, sample_tasks
from .source import TaskSource
from .stream import TaskDataset
from .tasks import Task, TaskBatch

EMBEDDED = ("glyphs",)


def parse_spec(spec: str, must_exist: bool = False) -> tuple[str, str]:
    """``"glyphs"`` → ``("glyphs", "")``; ``"<kind>:<path>"`` → ``(kind, path)``, checked.

    Raises :class:`DatasetLayoutError` (one line, naming the expected form or layout) for an
    unknown kind, a missing path, or -- with ``must_exist`` -- a path that does not exist.
    """
    if spec in ("glyphs", "glyphs:"):
        return "glyphs", ""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in LOADERS:
        raise DatasetLayoutError(
            f"dataset {spec!r}: expected 'glyphs' or '<kind>:<path>' with kind one of "
            f"{sorted(LOADERS)}"
        )
    if not path:
        raise DatasetLayoutError(
            f"dataset {spec!r}: missing path; expected layout: {LAYOUTS[kind]}"
        )
    if must_exist and not Path(path).expanduser().exists():
        raise DatasetLayoutError(
            f"dataset {spec!r}: {path} does not exist; expected layout: {LAYOUTS[kind]}"
        )
    return kind, path


def load(spec: str, **kwargs: Any) -> FewShotDataset:
    """``"glyphs"`` or ``"<kind>:<path>"`` → :class:`FewShotDataset`.

    Keyword arguments go to the loader (e.g. ``strict=False``, ``size=28``; for glyphs
    ``num_classes``, ``samples``, ``seed``). A wrong path or layout raises
    :class:`DatasetLayoutError` whose one-line message names the expected layout.
    """
    kind, path = parse_spec(spec)
    if kind == "glyphs":
        return load_glyphs(**kwargs)
    return LOADERS[kind](path, **kwargs)


__all__ = [
    "EMBEDDED",
    "LAYOUTS",
    "LOADERS",
    "SPLITS",
    "DatasetLayoutError",
    "FewShotDataset",
    "LazyImages",
    "Task",
    "TaskBatch",
    "TaskDataset",
    "TaskSource",
    "cache_root",
    "flip_labels",
    "load",
    "load_cifar_fewshot",
    "load_cub",
    "load_glyphs",
    "load_idx",
    "load_image_folder",
    "load_mini_imagenet",
    "load_npz",
    "load_omniglot",
    "load_tiered_imagenet",
    "parse_spec",
    "read_idx",
    "safe_unpickle",
    "sample_tasks",
]
