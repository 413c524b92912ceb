"""Deterministic mode: the same seed gives bit-identical scores, on the CPU and on a GPU.

On the CPU every metafluence computation is deterministic already for a fixed thread count
(fixed reduction orders; our C++ kernels sum partial results in a fixed order whatever the thread
count). torch's own CPU kernels (convolutions, matrix products) split their sums by thread, so a
different ``torch.get_num_threads()`` can change the last bits of a score: same seed, same thread
count, same machine and build give identical scores. On a GPU three things can change the last
bits of a score between runs:

* PyTorch kernels that accumulate with atomics (``index_add``, ``scatter_add``, the backward of
  ``index_select`` / ``gather``, some convolution algorithms);
* cuBLAS choosing split-K reductions per stream / workspace (needs
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` or ``:16:8``), and cuDNN benchmarking picking a different
  convolution algorithm per run;
* our own kernels, if a backend reduces with atomics. None does today (the CUDA reductions write
  per-tile partial sums and combine them in a fixed order; the Triton kernels use one fixed tile
  configuration, no autotuning, no atomics); a backend registered with
  ``nondeterministic=...`` in :func:`metafluence.ops._dispatch.register_op` is skipped in
  deterministic mode (and refused when forced).

:func:`set_deterministic` switches all of this at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["deterministic", "is_deterministic", "set_deterministic"]

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_VALUE = ":4096:8"

_ENABLED = False
_SAVED: dict[str, Any] | None = None  # settings before the first enable, restored on disable


def _snapshot() -> dict[str, Any]:
    return {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cublas_env": os.environ.get(CUBLAS_ENV),
    }


def set_deterministic(enabled: bool = True, *, warn_only: bool = False) -> dict[str, Any]:
    """Turn deterministic mode on (or off, restoring the settings it changed).

    On: ``torch.use_deterministic_algorithms(True, warn_only=warn_only)`` (an op with only a
    nondeterministic CUDA kernel then raises, or warns with ``warn_only``),
    ``torch.backends.cudnn.benchmark = False``, ``torch.backends.cudnn.deterministic = True``,
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (cuBLAS reads it when its handle is
    created: call this before the first CUDA matmul), and metafluence's ops use only backends
    with a fixed reduction order. It does not seed anything: pass ``seed=`` to the functions
    that draw (``meta_train``, ``sample_tasks``...) or call ``torch.manual_seed``.

    Args:
        enabled: ``True`` to enable, ``False`` to restore what was there before.
        warn_only: warn instead of raising on ops without a deterministic implementation.

    Returns:
        The settings now in force (``algorithms``, ``warn_only``, ``cudnn_benchmark``,
        ``cudnn_deterministic``, ``cublas_env``) plus ``enabled``.
    """
    global _ENABLED, _SAVED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if not isinstance(warn_only, bool):
        raise TypeError(f"warn_only must be a bool, got {type(warn_only).__name__}")
    if enabled:
        if _SAVED is None:
            _SAVED = _snapshot()
        if os.environ.get(CUBLAS_ENV) not in (":4096:8", ":16:8"):
            os.environ[CUBLAS_ENV] = CUBLAS_VALUE
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif _SAVED is not None:
        torch.use_deterministic_algorithms(_SAVED["algorithms"], warn_only=_SAVED["warn_only"])
        torch.backends.cudnn.benchmark = _SAVED["cudnn_benchmark"]
        torch.backends.cudnn.deterministic = _SAVED["cudnn_deterministic"]
        if _SAVED["cublas_env"] is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = _SAVED["cublas_env"]
        _SAVED = None
    _ENABLED = enabled
    return {"enabled": enabled, **_snapshot()}


def is_deterministic() -> bool:
    """Whether deterministic mode is on (:func:`set_deterministic`, or PyTorch's own
    ``torch.use_deterministic_algorithms(True)``)."""
    return _ENABLED or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic(enabled: bool = True, *, warn_only: bool = False) -> Iterator[None]:
    """Context manager form of :func:`set_deterministic` (restores the previous mode)."""
    was, was_warn = _ENABLED, torch.is_deterministic_algorithms_warn_only_enabled()
    set_deterministic(enabled, warn_only=warn_only)
    try:
        yield
    finally:
        set_deterministic(was, warn_only=was_warn if was else False)
