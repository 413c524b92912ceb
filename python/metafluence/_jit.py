"""Compiles the native module against the *installed* torch at first use, into a per-user cache.

The wheel and the sdist are pure Python: they carry the C++ sources (``metafluence/_csrc``, the
``csrc/`` of the source tree) but no compiled code, so nothing about torch is needed to build or
install them. The first import compiles the CPU kernels with the system C++ compiler against the
torch that is running and caches the result under

    ``$METAFLUENCE_CACHE_DIR`` or ``$XDG_CACHE_HOME/metafluence`` or ``~/.cache/metafluence``
    / ``native/torch<version>-<python tag>-<key>/``

where ``<key>`` hashes the sources, the torch build and this recipe; later imports only load
it. A file lock serialises concurrent first imports (several worker processes). A failed
compile leaves ``FAILED`` and ``build.log`` there and is not retried on every import:
``metafluence build`` retries (and prints the compiler's output).

Only the CPU kernels are compiled here; CUDA kernels need the CMake build from a source checkout
(``METAFLUENCE_BUILD_NATIVE=1 pip install --no-build-isolation .`` with a CUDA torch and nvcc).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "SUPPORTED_TORCH",
    "JitError",
    "torch_supported",
    "cache_dir",
    "ensure_built",
    "load",
    "source_root",
    "is_source_checkout",
]

# The torch versions this release is tested with; pyproject.toml declares the same range
# (tests/test_packaging.py checks that they agree).
SUPPORTED_TORCH = ">=2.13,<2.15"
RECIPE = 1  # bump whenever the compile recipe below changes: it is part of the cache key
MODULE_NAME = "metafluence._C"
ENV_CACHE = "METAFLUENCE_CACHE_DIR"
BUILD_FIX = "metafluence build"  # the command that compiles (and shows the compiler's output)
_HASHED_SUFFIXES = (".cpp", ".h", ".cu", ".in")


class JitError(RuntimeError):
    """The native module could not be compiled or loaded.

    Attributes:
        problem: what went wrong, in one sentence.
        fix: the command or step that repairs it.
        log: the build log, when a compiler ran.
    """

    def __init__(self, problem: str, fix: str, log: Path | None = None) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix
        self.log = log


def torch_supported(version: str | None = None) -> bool:
    """True if ``version`` (default: the running torch) lies in :data:`SUPPORTED_TORCH`."""
    text = str(torch.__version__ if version is None else version)

    def key(v: str) -> tuple[int, ...]:
        parts = v.split("+")[0].split(".")[:3]
        return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)

    low, high = (s.lstrip("><=") for s in SUPPORTED_TORCH.split(","))
    return key(low) <= key(text) < key(high)


def _failure_fix() -> str:
    """The fix for a failed compile: the supported torch range if outside it, then the retry."""
    retry = f"after fixing the cause, retry with: {BUILD_FIX}"
    if torch_supported():
        return retry
    return (
        f"torch {torch.__version__} is outside the supported range: "
        f"pip install 'torch{SUPPORTED_TORCH}'; {retry}"
    )


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def is_source_checkout() -> bool:
    """True when this package is imported from a source tree (editable install)."""
    root = _package_dir().parent.parent
    return (root / "pyproject.toml").is_file() and (root / "CMakeLists.txt").is_file()


def source_root() -> Path | None:
    """The C++ sources of this install: ``metafluence/_csrc`` (wheel) or ``<checkout>/csrc``."""
    pkg = _package_dir()
    for cand in (pkg / "_csrc", pkg.parent.parent / "csrc"):
        if (cand / "ops.cpp").is_file() and (cand / "bindings.cpp").is_file():
            return cand
    return None


def cache_dir() -> Path:
    """The per-user cache of compiled modules (``$METAFLUENCE_CACHE_DIR`` overrides it)."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metafluence"


def _families(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*_cpu.cpp")))


def _translation_units(root: Path) -> list[Path]:
    return [root / "ops.cpp", root / "bindings.cpp", *sorted(root.glob("*/*_cpu.cpp"))]


def _build_key(root: Path) -> str:
    h = hashlib.sha256()
    torch_id = (
        torch.__version__,
        getattr(torch.version, "git_version", ""),
        torch.version.cuda or "",
    )
    for part in (str(RECIPE), *torch_id, sys.implementation.cache_tag, platform.machine()):
        h.update(part.encode() + b"\0")
    for path in sorted(p for p in root.rglob("*") if p.suffix in _HASHED_SUFFIXES):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def target_dir(root: Path) -> Path:
    """Where the module compiled from ``root`` for the running torch lives in the cache."""
    version = "".join(c if c.isalnum() or c in ".+-" else "_" for c in torch.__version__)
    tag = sys.implementation.cache_tag
    return cache_dir() / "native" / f"torch{version}-{tag}-{_build_key(root)[:16]}"


def _library(out: Path) -> Path:
    return out / f"_C{sysconfig.get_config_var('EXT_SUFFIX') or '.so'}"


def find_compiler() -> str | None:
    """The C++ compiler: ``$CXX`` if set (even when it does not exist), else c++, g++, clang++."""
    env = os.environ.get("CXX", "").strip()
    if env:
        return shutil.which(env) or env
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held by this process (released if it dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _config(root: Path, cxx: str) -> dict[str, Any]:
    return {
        "TORCH_VERSION": str(torch.__version__),
        "TORCH_CUDA_VERSION": torch.version.cuda or "",
        "CUDA_MODE": "OFF",
        "CUDA_VERSION": "",
        "CUDA_ARCHS": [],
        "CUDA_REASON": "compiled at first use for the CPU only; CUDA kernels need a source "
        "build: METAFLUENCE_BUILD_NATIVE=1 pip install --no-build-isolation <sdist or checkout>",
        "CXX_COMPILER": cxx,
        "KERNEL_FAMILIES": _families(root),
        "BUILT_BY": "jit",
    }


def _compile(root: Path, out: Path, cxx: str, verbose: bool) -> None:
    py_include = Path(sysconfig.get_paths()["include"])
    if not (py_include / "Python.h").is_file():
        raise JitError(
            f"the Python headers are missing ({py_include / 'Python.h'})",
            f"install them (e.g. apt-get install python3-dev), then run: {BUILD_FIX}",
        )
    torch_dir = Path(torch.__file__).resolve().parent
    config = _config(root, cxx)
    defines = {
        "TORCH_VERSION": config["TORCH_VERSION"],
        "CUDA_MODE": "OFF",
        "CUDA_VERSION": "",
        "CUDA_ARCHS": "",
        "FAMILIES": ",".join(config["KERNEL_FAMILIES"]),
    }
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    cflags = [
        cxx,
        "-O3",
        "-std=c++20",  # torch >= 2.14 headers need C++20
        "-fPIC",
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-isystem{torch_dir / 'include'}",
        f"-isystem{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-isystem{py_include}",
        f"-I{root}",
        *(f'-DMETAFLUENCE_{k}="{v}"' for k, v in defines.items()),
    ]
    obj_dir = out / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)
    units = _translation_units(root)
    objects = [obj_dir / f"{i:02d}_{tu.stem}.o" for i, tu in enumerate(units)]
    commands = [
        [*cflags, "-c", str(tu), "-o", str(obj)] for tu, obj in zip(units, objects, strict=True)
    ]
    lib = _library(out)
    partial = lib.with_name(lib.name + f".{os.getpid()}.tmp")
    link = [cxx, "-shared", *map(str, objects), "-o", str(partial), "-fopenmp"]
    link += [f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        if verbose:
            print(" ".join(cmd), file=sys.stderr, flush=True)
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    jobs = max(1, min(len(commands), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(run, commands))
    if all(r.returncode == 0 for r in results):
        results.append(run(link))
    log = out / "build.log"
    with open(log, "w") as fh:
        for res in results:
            fh.write(f"$ {' '.join(res.args)}\n{res.stdout}{res.stderr}[exit {res.returncode}]\n")
    failed = next((r for r in results if r.returncode != 0), None)
    if verbose:
        for res in results:
            sys.stderr.write(res.stdout + res.stderr)
    if failed is not None:
        partial.unlink(missing_ok=True)
        output = (failed.stderr + failed.stdout).splitlines()
        lines = [ln for ln in output if "error" in ln] or output
        first = lines[0].strip() if lines else "no output"
        what = f"{Path(failed.args[0]).name} exited with status {failed.returncode}: {first}"
        (out / "FAILED").write_text(what + "\n")
        raise JitError(
            f"compiling the native kernels against torch {torch.__version__} with {cxx} "
            f"failed ({what}; log: {log})",
            _failure_fix(),
            log,
        )
    os.replace(partial, lib)
    shutil.rmtree(obj_dir, ignore_errors=True)
    tmp_cfg = out / f"config.json.{os.getpid()}.tmp"
    tmp_cfg.write_text(json.dumps(config, indent=1))
    os.replace(tmp_cfg, out / "config.json")  # written last: marks a complete build


def _cached(out: Path) -> dict[str, Any] | None:
    cfg = out / "config.json"
    if not (cfg.is_file() and _library(out).is_file()):
        return None
    return dict(json.loads(cfg.read_text()))


def _root_or_raise() -> Path:
    root = source_root()
    if root is None:
        raise JitError(
            "this install carries no C++ sources (no metafluence/_csrc)",
            "reinstall metafluence from its wheel or sdist: pip install --force-reinstall "
            "--no-deps metafluence",
        )
    return root


def ensure_built(*, retry_failed: bool = False, force: bool = False, verbose: bool = False) -> Path:
    """Compile the native module for the running torch unless the cache already has it.

    Args:
        retry_failed: compile again even if an earlier attempt failed (``FAILED`` marker).
        force: compile again even if a complete build is cached.
        verbose: print the compiler commands and their output to stderr.

    Returns:
        The cache directory holding ``_C<ext>`` and ``config.json``.

    Raises:
        JitError: no sources, no compiler, no Python headers, or the compiler failed.
    """
    root = _root_or_raise()
    out = target_dir(root)
    try:
        return _build_locked(root, out, retry_failed, force, verbose)
    except OSError as exc:  # cache not writable, disk full, ...
        raise JitError(
            f"cannot write the cache {cache_dir()}: {type(exc).__name__}: {exc}",
            f"set {ENV_CACHE} to a writable folder, then run: {BUILD_FIX}",
        ) from exc


def _build_locked(root: Path, out: Path, retry_failed: bool, force: bool, verbose: bool) -> Path:
    with _locked(out.with_name(out.name + ".lock")):
        if _cached(out) is not None and not force:
            return out
        if (out / "FAILED").is_file() and not (retry_failed or force):
            reason = (out / "FAILED").read_text().strip()
            raise JitError(
                f"compiling the native kernels against torch {torch.__version__} failed "
                f"earlier ({reason}; log: {out / 'build.log'})",
                _failure_fix(),
                out / "build.log",
            )
        cxx = find_compiler()
        if cxx is None:
            raise JitError(
                "no C++ compiler found (looked at $CXX, c++, g++, clang++)",
                f"install one (e.g. apt-get install g++) or set CXX, then run: {BUILD_FIX}",
            )
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        start = time.perf_counter()
        print(
            f"metafluence: compiling the native kernels for torch {torch.__version__} into "
            f"{out} (once per torch version; about a minute)",
            file=sys.stderr,
            flush=True,
        )
        _compile(root, out, cxx, verbose)
        print(
            f"metafluence: compiled in {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return out


def load(*, build: bool) -> tuple[ModuleType, dict[str, Any], Path]:
    """Import the module compiled for the running torch, compiling it first if ``build``.

    Returns:
        ``(module, config, directory)``; the module is registered as ``metafluence._C``.

    Raises:
        JitError: nothing compiled yet and ``build`` is False, or compiling or importing failed.
    """
    root = _root_or_raise()
    out = target_dir(root)
    if _cached(out) is None:
        if not build:
            raise JitError(
                f"no native module compiled for torch {torch.__version__} yet "
                "(METAFLUENCE_JIT=0 turns off compiling at first use)",
                f"compile it with: {BUILD_FIX}",
            )
        out = ensure_built()
    config = _cached(out)
    assert config is not None
    lib = _library(out)
    try:
        spec = importlib.util.spec_from_file_location(MODULE_NAME, lib)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE_NAME] = module
        spec.loader.exec_module(module)
    except Exception as exc:  # undefined symbol after a torch reinstall, ...
        sys.modules.pop(MODULE_NAME, None)
        raise JitError(
            f"import of the cached native module {lib} failed: {type(exc).__name__}: {exc}",
            f"recompile it with: {BUILD_FIX} --force",
        ) from exc
    return module, config, out
