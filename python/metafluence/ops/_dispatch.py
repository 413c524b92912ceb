"""Backend selection shared by every op in :mod:`metafluence.ops`.

Backends, in the order ``auto`` tries them:

* ``native``    -- the compiled kernels of ``metafluence._C`` (C++ on CPU, CUDA on GPU), called
  through ``torch.ops.metafluence.<op>``;
* ``triton``    -- Triton kernels (GPU; on CPU only under ``TRITON_INTERPRET=1``, and ``auto``
  never picks the interpreter);
* ``reference`` -- the pure-PyTorch twin in :mod:`metafluence.reference` (always works).

The backend is forced with the ``backend=`` argument of an op or the environment variable
``METAFLUENCE_BACKEND=reference|torch|native|triton`` (``torch`` is an alias of ``reference``;
``auto`` or empty means automatic). A forced backend that cannot run raises
:class:`BackendUnavailableError`, whose message lists every backend and why it was accepted or
rejected.

In deterministic mode (:func:`metafluence.set_deterministic`) a backend registered as
nondeterministic (``register_op(..., nondeterministic={name: why})``) is rejected like an
unavailable one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping

import torch

from .. import _loader

BACKENDS: tuple[str, ...] = ("native", "triton", "reference")
_ALIASES = {"torch": "reference", "ref": "reference", "c": "native", "cpp": "native"}
ENV_VAR = "METAFLUENCE_BACKEND"

#: ``check(device, dtype) -> None`` if the backend can run, else the reason it cannot.
Check = Callable[[torch.device, torch.dtype], str | None]


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run for these inputs."""


def normalize_backend(name: str | None) -> str | None:
    """Map a user spelling to a canonical backend name; ``None`` means automatic."""
    if name is None:
        return None
    key = name.strip().lower()
    if key in ("", "auto"):
        return None
    key = _ALIASES.get(key, key)
    if key not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; expected one of auto, reference (alias torch), native, "
            "triton"
        )
    return key


def requested_backend(backend: str | None) -> str | None:
    """The backend asked for: the ``backend=`` argument if given, else ``METAFLUENCE_BACKEND``."""
    if backend is not None:
        return normalize_backend(backend)
    return normalize_backend(os.environ.get(ENV_VAR))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_installed() -> bool:
    """True if Triton can be imported (checked without importing it: importing triton before
    ``TRITON_INTERPRET`` is set breaks the interpreter later)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def native_check(op: str, dtypes: tuple[torch.dtype, ...]) -> Check:
    """Standard availability check for a compiled op supporting ``dtypes``."""

    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        if not _loader.STATE.loaded:
            return f"compiled module not loaded: {_loader.STATE.reason}"
        if not _loader.has_kernel(op, device.type):
            if device.type == "cuda":
                cfg = _loader.STATE.config
                why = cfg.get("CUDA_REASON") or (
                    f"built with METAFLUENCE_CUDA={cfg.get('CUDA_MODE', '?')}; "
                    "CUDA ops need a CUDA build of torch"
                )
                return f"no CUDA kernel registered for metafluence::{op} ({why})"
            return f"no {device.type} kernel registered for metafluence::{op}"
        if dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {names})"
        return None

    return check


def triton_check(dtypes: tuple[torch.dtype, ...]) -> Check:
    """Standard availability check for a Triton kernel supporting ``dtypes``."""

    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        if not triton_installed():
            return "triton is not installed"
        if device.type == "cpu":
            if not triton_interpreting():
                return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        elif device.type != "cuda":
            return f"device type {device.type} not supported"
        if dtype not in dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {names})"
        return None

    return check


def reference_check(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


#: op name -> its backend checks (filled by each op module via :func:`register_op`)
REGISTRY: dict[str, Mapping[str, Check]] = {}
#: op name -> the order ``auto`` tries on CPU when it is not the default ``(native, reference)``
#: (an op whose native CPU kernel a committed benchmark found slower than its reference)
CPU_ORDER: dict[str, tuple[str, ...]] = {}


def register_op(
    op: str,
    checks: Mapping[str, Check],
    nondeterministic: Mapping[str, str] | None = None,
    cpu_order: tuple[str, ...] | None = None,
) -> Mapping[str, Check]:
    """Record the backend checks of ``op`` (one entry per name in :data:`BACKENDS`).

    ``cpu_order``: the order ``auto`` tries on CPU instead of ``(native, reference)`` — for an
    op whose native CPU kernel is slower than its reference (the op module cites the
    benchmark); a forced ``backend="native"`` still runs it.

    ``nondeterministic`` maps a backend whose results can change between runs (float atomics,
    autotuned reduction orders) to the reason; in deterministic mode
    (:func:`metafluence.set_deterministic`) those backends are rejected with that reason, so
    ``auto`` routes around them and forcing one raises :class:`BackendUnavailableError`. Every
    backend of the ops shipped today reduces in a fixed order (none is listed).
    """
    missing = set(BACKENDS) - set(checks)
    if missing:
        raise ValueError(f"{op}: no check for backends {sorted(missing)}")
    unknown = set(nondeterministic or {}) - set(BACKENDS)
    if unknown:
        raise ValueError(f"{op}: nondeterministic names unknown backends {sorted(unknown)}")
    if nondeterministic:
        checks = {
            name: (
                _deterministic_only(check, nondeterministic[name])
                if name in nondeterministic
                else check
            )
            for name, check in checks.items()
        }
    if cpu_order is not None:
        if set(cpu_order) - {"native", "reference"} or not cpu_order:
            raise ValueError(f"{op}: cpu_order {cpu_order} must order 'native' and 'reference'")
        CPU_ORDER[op] = tuple(cpu_order)
    REGISTRY[op] = checks
    return checks


def register_ops(
    ops: tuple[str, ...], dtypes: tuple[torch.dtype, ...]
) -> dict[str, Mapping[str, Check]]:
    """:func:`register_op` with the standard checks (native kernel, Triton, reference) for each
    of ``ops`` supporting ``dtypes``; ``{op: checks}``."""
    return {
        op: register_op(
            op,
            {
                "native": native_check(op, dtypes),
                "triton": triton_check(dtypes),
                "reference": reference_check,
            },
        )
        for op in ops
    }


def _deterministic_only(check: Check, why: str) -> Check:
    """Wrap ``check`` so that it rejects the backend while deterministic mode is on."""

    def wrapped(device: torch.device, dtype: torch.dtype) -> str | None:
        from .._determinism import is_deterministic

        if is_deterministic():
            return f"nondeterministic ({why}) and deterministic mode is on"
        return check(device, dtype)

    return wrapped


def backend_report(
    op: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, str | None]:
    """For each backend: ``None`` if it can run ``op`` on ``device``/``dtype``, else why not."""
    return explain(REGISTRY[op], torch.device(device), dtype)


def explain(
    checks: Mapping[str, Check], device: torch.device, dtype: torch.dtype
) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run, else why not."""
    return {name: checks[name](device, dtype) for name in BACKENDS}


def _auto_order(device: torch.device, op: str | None = None) -> tuple[str, ...]:
    # The Triton interpreter is a correctness tool, far too slow to be picked automatically.
    if device.type == "cuda":
        return ("native", "triton", "reference")
    return CPU_ORDER.get(op, ("native", "reference")) if op is not None else ("native", "reference")


def format_report(op: str, reasons: Mapping[str, str | None], chosen: str | None = None) -> str:
    lines = []
    for name in BACKENDS:
        why = reasons[name]
        if why is None:
            status = "available" + (" (chosen)" if name == chosen else "")
        else:
            status = f"rejected: {why}"
        lines.append(f"  {name}: {status}")
    return "\n".join(lines)


def select_backend(
    op: str,
    checks: Mapping[str, Check],
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = None,
) -> str:
    """Choose the backend for one call of ``op``.

    ``backend`` (else ``METAFLUENCE_BACKEND``) forces one; otherwise ``native`` if a kernel exists
    for the device, then ``triton`` on CUDA, then ``reference`` (on CPU the op's
    :data:`CPU_ORDER` where it has one). Under ``torch.compile`` only
    ``backend="native"`` or the reference path are used (the checks would break the graph).
    """
    if torch.compiler.is_compiling():
        # Under torch.compile the availability checks (dispatcher queries, imports) cannot be
        # traced: use the explicit argument if it is traceable, else the reference twin, which
        # the compiler fuses itself.
        normalized = normalize_backend(backend) if backend is not None else None
        return normalized if normalized in ("native", "reference") else "reference"
    wanted = requested_backend(backend)
    if wanted is not None:
        why = checks[wanted](device, dtype)
        if why is None:
            return wanted
        reasons = explain(checks, device, dtype)
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise BackendUnavailableError(
            f"{op}: backend {wanted!r} ({source}{backend or os.environ.get(ENV_VAR)}) cannot run "
            f"on device {device} with dtype {str(dtype).removeprefix('torch.')}:\n"
            + format_report(op, reasons)
        )
    for name in _auto_order(device, op):
        if checks[name](device, dtype) is None:
            return name
    return "reference"
