"""``build_info()``: what was compiled, against what, and why anything is missing."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from . import _loader
from ._version import __version__
from .ops import _dispatch

__all__ = ["build_info"]


def _triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict[str, Any]:
    """Build and runtime information.

    Returns a dict with keys ``version``, ``torch_runtime``, ``torch_built`` (torch the compiled
    module was built for, or ``None``), ``native`` (``{"loaded": bool, "reason": str | None}``),
    ``compiler``, ``cuda`` (``{"status": "built" | "compile-only" | "absent", "version", "archs",
    "reason"}``), ``kernel_families``, ``kernels`` (``{"cpu": bool, "cuda": bool |
    "compile-only", "triton": bool}``), ``triton`` (version and where it can run) and ``missing``
    (kernel kind -> why it is not available).
    """
    state = _loader.STATE
    cfg = state.config
    c_info: dict[str, Any] = {}
    if state.module is not None:
        c_info = dict(state.module.build_info())
    missing: dict[str, str] = {}

    # --- CPU kernels
    cpu = state.loaded and bool(c_info.get("cpu_kernels", False))
    if not cpu:
        missing["cpu"] = state.reason or "compiled module has no CPU kernels"

    # --- CUDA kernels
    mode = str(c_info.get("cuda_mode", cfg.get("CUDA_MODE", "")))
    cuda_version = c_info.get("cuda_version", cfg.get("CUDA_VERSION")) or None
    cuda: dict[str, Any] = {
        "version": cuda_version,
        "archs": list(c_info.get("cuda_archs", cfg.get("CUDA_ARCHS", []))),
        "torch_cuda": torch.version.cuda,
        "device_available": torch.cuda.is_available(),
    }
    cuda_kernels: bool | str
    if not cfg:
        cuda.update(status="absent", reason=state.reason)
        cuda_kernels = False
    elif mode == "ON":
        cuda.update(status="built", reason=None)
        cuda_kernels = state.loaded
        if not state.loaded:
            cuda["reason"] = state.reason
    elif mode == "COMPILE_ONLY":
        cuda.update(
            status="compile-only",
            reason="kernels compiled with nvcc but not linked: torch "
            f"{cfg.get('TORCH_VERSION')} is a CPU build (CUDA ops need a CUDA torch)",
        )
        cuda_kernels = "compile-only"
    else:
        default = "built with METAFLUENCE_CUDA=OFF or without nvcc"
        cuda.update(status="absent", reason=cfg.get("CUDA_REASON", default))
        cuda_kernels = False
    if cuda_kernels is not True:
        missing["cuda"] = str(cuda["reason"])

    # --- Triton
    triton_ok = _dispatch.triton_installed()
    if triton_ok:
        if torch.cuda.is_available():
            runs_on = "cuda"
        elif _dispatch.triton_interpreting():
            runs_on = "cpu (TRITON_INTERPRET=1)"
        else:
            runs_on = "nowhere now: no GPU; set TRITON_INTERPRET=1 to run on the CPU interpreter"
    else:
        runs_on = "nowhere"
        missing["triton"] = "triton is not installed (pip install triton)"

    return {
        "version": __version__,
        "torch_runtime": torch.__version__,
        "torch_built": c_info.get("torch_version", cfg.get("TORCH_VERSION")),
        "native": {
            "loaded": state.loaded,
            "reason": state.reason,
            "source": state.source,
            "path": None if state.path is None else str(state.path),
        },
        "compiler": c_info.get("compiler", cfg.get("CXX_COMPILER")),
        "cuda": cuda,
        "kernel_families": list(c_info.get("kernel_families", cfg.get("KERNEL_FAMILIES", []))),
        "kernels": {"cpu": cpu, "cuda": cuda_kernels, "triton": triton_ok},
        "triton": {"version": _triton_version(), "runs_on": runs_on},
        "missing": missing,
    }
