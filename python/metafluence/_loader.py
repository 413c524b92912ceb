"""Loads the compiled extension ``metafluence._C`` (if it can be loaded safely).

Order matters: ``torch`` is imported first (it loads libtorch, libgomp and, on CUDA builds,
libcudart, which ``_C`` links against). Then the build record ``_build_config.py`` that CMake
wrote next to the module is read, and ``_C`` is imported only if it was built for the torch that
is running: a module built for another torch could crash on import, so a mismatch is reported,
not attempted. Every failure is recorded in :data:`STATE` and the package keeps working on its
reference (pure PyTorch) path.

Environment: ``METAFLUENCE_DISABLE_C=1`` skips the compiled module entirely (used by tests to
simulate a machine without it).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

REBUILD_HINT = "rebuild with: pip install --no-build-isolation -e ."
_TRUTHY = {"1", "true", "yes", "on"}


@dataclass
class LoaderState:
    """What happened when the compiled module was looked for."""

    module: ModuleType | None = None
    config: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why ``module`` is None

    @property
    def loaded(self) -> bool:
        return self.module is not None


def _read_config() -> dict[str, Any] | None:
    try:
        cfg = importlib.import_module("metafluence._build_config")
    except ImportError:
        return None
    return {k: v for k, v in vars(cfg).items() if k.isupper()}


def _load() -> LoaderState:
    state = LoaderState()
    if os.environ.get("METAFLUENCE_DISABLE_C", "").strip().lower() in _TRUTHY:
        state.reason = "disabled by the environment (METAFLUENCE_DISABLE_C=1)"
        return state
    cfg = _read_config()
    if cfg is None:
        state.reason = (
            "the compiled module is not built (no metafluence/_build_config.py); "
            "build it with: pip install --no-build-isolation -e ."
        )
        return state
    state.config = cfg
    built = str(cfg.get("TORCH_VERSION", ""))
    running = str(torch.__version__)
    if built != running:
        state.reason = f"built for torch {built}, running {running}; {REBUILD_HINT}"
        return state
    try:
        state.module = importlib.import_module("metafluence._C")
    except Exception as exc:  # ImportError, undefined symbol (ImportError/OSError), ...
        state.reason = (
            f"import of metafluence._C failed: {type(exc).__name__}: {exc}; {REBUILD_HINT}"
        )
    return state


STATE: LoaderState = _load()


def has_kernel(op: str, device_type: str) -> bool:
    """True if the dispatcher has a native kernel for ``metafluence::<op>`` on ``device_type``."""
    if not STATE.loaded:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"metafluence::{op}", key))
    except RuntimeError:  # op not registered at all
        return False
