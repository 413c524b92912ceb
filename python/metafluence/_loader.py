"""Loads the compiled extension ``metafluence._C``, compiling it for the running torch if needed.

Order matters: ``torch`` is imported first (it loads libtorch, libgomp and, on CUDA builds,
libcudart, which ``_C`` links against). Then, in this order:

1. A *prebuilt* module (a CMake build: ``make install`` / an editable install, or a wheel built
   with ``METAFLUENCE_BUILD_NATIVE=1``) is imported if the build record ``_build_config.py`` that
   CMake wrote next to it names the running torch. A module built for another torch could crash
   on import, so it is never imported then.
2. Otherwise the module is compiled against the running torch at first use and cached per user
   (:mod:`metafluence._jit`); later imports just load it.
3. If neither works, the package keeps working on its reference (pure PyTorch) path and says so
   once, with the exact fix, as a :class:`NativeModuleWarning`; :data:`STATE` keeps the reason
   (``metafluence.build_info()["native"]``).

Environment: ``METAFLUENCE_DISABLE_C=1`` skips the compiled module entirely and silently (also
used by tests to simulate a machine without it); ``METAFLUENCE_JIT=0`` never compiles at import
(a missing or stale module is then reported); ``METAFLUENCE_CACHE_DIR`` moves the cache.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import _jit

ENV_DISABLE = "METAFLUENCE_DISABLE_C"
ENV_JIT = "METAFLUENCE_JIT"
CHECKOUT_FIX = "in the source checkout run: make install (pip install --no-build-isolation -e .)"
SILENCE_HINT = f"{ENV_DISABLE}=1 uses the pure-PyTorch path without this warning"
_TRUTHY = {"1", "true", "yes", "on"}
_FALSY = {"0", "false", "no", "off"}


class NativeModuleWarning(UserWarning):
    """The compiled kernels are not used: the message says why and how to fix it."""


@dataclass
class LoaderState:
    """What happened when the compiled module was looked for."""

    module: ModuleType | None = None
    config: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # why ``module`` is None
    source: str | None = None  # "prebuilt" (CMake build) or "jit" (compiled at first use)
    path: Path | None = None  # where a JIT-compiled module lives

    @property
    def loaded(self) -> bool:
        return self.module is not None


def _read_config() -> dict[str, Any] | None:
    try:
        cfg = importlib.import_module("metafluence._build_config")
    except ImportError:
        return None
    return {k: v for k, v in vars(cfg).items() if k.isupper()}


def _import_prebuilt(cfg: dict[str, Any]) -> tuple[ModuleType | None, str | None]:
    """Import the CMake-built module if it was built for the running torch; else say why not."""
    built = str(cfg.get("TORCH_VERSION", ""))
    running = str(torch.__version__)
    if built != running:
        return None, f"the prebuilt native module was built for torch {built}, running {running}"
    try:
        return importlib.import_module("metafluence._C"), None
    except Exception as exc:  # ImportError, undefined symbol (ImportError/OSError), ...
        return None, f"import of the prebuilt metafluence._C failed: {type(exc).__name__}: {exc}"


def _unexpected(exc: Exception) -> _jit.JitError:
    return _jit.JitError(
        f"loading the native module failed unexpectedly: {type(exc).__name__}: {exc}",
        f"run: {_jit.BUILD_FIX} --force (and report it if that fails too)",
    )


def _load() -> LoaderState:
    state = LoaderState()
    if os.environ.get(ENV_DISABLE, "").strip().lower() in _TRUTHY:
        state.reason = f"disabled by the environment ({ENV_DISABLE}=1)"
        return state
    cfg = _read_config()
    prebuilt_problem = None
    if cfg is not None:
        module, prebuilt_problem = _import_prebuilt(cfg)
        if module is not None:
            state.module, state.config, state.source = module, cfg, "prebuilt"
            return state
    build = os.environ.get(ENV_JIT, "").strip().lower() not in _FALSY
    try:
        state.module, state.config, state.path = _jit.load(build=build)
        state.source = "jit"
    except Exception as exc:  # JitError, or anything unforeseen: never break the import
        err = exc if isinstance(exc, _jit.JitError) else _unexpected(exc)
        problems = "; ".join(p for p in (prebuilt_problem, err.problem) if p)
        fix = err.fix
        if prebuilt_problem is not None and _jit.is_source_checkout():
            fix = f"{fix}; or rebuild the prebuilt one: {CHECKOUT_FIX}"
        state.config = cfg or {}
        state.reason = f"{problems}. Fix: {fix}. ({SILENCE_HINT})"
        warnings.warn(
            f"metafluence: native kernels not loaded, using the pure-PyTorch path: {state.reason}",
            NativeModuleWarning,
            stacklevel=2,
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
