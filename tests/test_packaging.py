"""Packaging (issue 18): metafluence as a dependency of other libraries.

The sdist and the wheel build with default build isolation, are pure Python, never write into
the source tree, install into a fresh venv that already has a CPU torch without pulling another
torch, and the installed package passes its smoke test from outside the tree (its native module
compiled against the installed torch at first import). A module that cannot be compiled or
loaded is reported once, with the fix, and is not recompiled on every import.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from metafluence import _jit

REPO = Path(__file__).resolve().parents[1]
TORCH_SPEC = f"torch=={torch.__version__.split('+')[0]}"  # the CPU torch this venv already has
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".hypothesis", ".ruff_cache", ".mypy_cache"}


def _env(**extra: str) -> dict[str, str]:
    """This environment without anything that points into the dev venv or picks a backend."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("METAFLUENCE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(extra)
    return env


def _run(cmd: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    """Run ``cmd``; fail the test with the tail of its output if it fails. Returns its output."""
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out[-4000:]}"
    return out


def _tree(root: Path) -> set[str]:
    """Every path below ``root`` (but VCS, venv and cache folders): what a build could add."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(root)
        found.update(str(rel / name) for name in (*dirnames, *filenames))
    return found


def _python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = _env(METAFLUENCE_CACHE_DIR=str(cache), **env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300
    )


# A torch this source tree was not built for: the prebuilt module must not be imported.
MISMATCH = (
    "import sys, torch\n"
    "torch.__version__ = '9.9.9'\n"
    "import metafluence as mf\n"
    "assert 'metafluence._C' not in sys.modules\n"
    "print(mf.build_info()['native'])\n"
    "print(mf.psg_linear(torch.ones(1, 1, 2), torch.ones(1, 1, 3)).shape)\n"
)


def test_declared_torch_range_is_the_supported_one():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b", d)]
    declared = sorted(torch_dep.removeprefix("torch").replace(" ", "").split(","))
    assert declared == sorted(_jit.SUPPORTED_TORCH.split(","))
    assert _jit.torch_supported()  # the torch the tests run on
    assert not _jit.torch_supported("2.12.1") and not _jit.torch_supported("2.15.0+cpu")
    assert _jit.torch_supported("2.14.1+cu130")


def test_failed_compile_is_reported_once_and_not_retried(tmp_path):
    proc = _python(MISMATCH, tmp_path, CXX="/bin/false")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("NativeModuleWarning") == 1, proc.stderr
    assert proc.stderr.count("compiling the native kernels for torch 9.9.9") == 1
    for text in (
        "built for torch",  # the stale prebuilt module is named ...
        "false exited with status 1",  # ... and so is the failed compile, with its log
        "build.log",
        "torch 9.9.9 is outside the supported range: pip install 'torch>=2.13,<2.15'",
        "retry with: metafluence build",
        "METAFLUENCE_DISABLE_C=1",
    ):
        assert text in proc.stderr, text
    assert "'loaded': False" in proc.stdout and "torch.Size([1, 3, 2])" in proc.stdout
    again = _python(MISMATCH, tmp_path, CXX="/bin/false")
    assert again.returncode == 0, again.stderr
    assert "compiling the native kernels for" not in again.stderr  # not retried at every import
    assert again.stderr.count("NativeModuleWarning") == 1
    assert "failed earlier (false exited with status 1" in again.stderr


def test_missing_compiler_is_reported_with_the_fix(tmp_path):
    env = _env(METAFLUENCE_CACHE_DIR=str(tmp_path), PATH=str(tmp_path / "empty"))
    proc = subprocess.run(
        [sys.executable, "-c", MISMATCH], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("NativeModuleWarning") == 1, proc.stderr
    assert "no C++ compiler found" in proc.stderr
    assert "install one (e.g. apt-get install g++) or set CXX, then run: metafluence build" in (
        proc.stderr
    )


def test_unwritable_cache_is_reported_with_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    proc = _python(MISMATCH, blocker / "cache")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("NativeModuleWarning") == 1, proc.stderr
    assert f"cannot write the cache {blocker / 'cache'}" in proc.stderr
    assert "set METAFLUENCE_CACHE_DIR to a writable folder, then run: metafluence build" in (
        proc.stderr
    )


def test_load_without_compiling_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(_jit.ENV_CACHE, str(tmp_path))
    with pytest.raises(_jit.JitError, match="no native module compiled for torch") as err:
        _jit.load(build=False)
    assert err.value.fix == "compile it with: metafluence build"
    assert not (tmp_path / "native").exists() or not any((tmp_path / "native").iterdir())


def test_cache_key_follows_sources_and_torch(tmp_path, monkeypatch):
    root = _jit.source_root()
    assert root is not None and (root / "ops.cpp").is_file()
    copy = tmp_path / "csrc"
    shutil.copytree(root, copy)
    key = _jit._build_key(copy)
    assert _jit._build_key(copy) == key
    (copy / "psg" / "psg_linear_kernel.h").write_text("// edited\n", encoding="utf-8")
    assert _jit._build_key(copy) != key
    edited = _jit._build_key(copy)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cpu")
    assert _jit._build_key(copy) != edited


def test_cli_build_with_matching_prebuilt_module(capsys):
    from metafluence import _loader
    from metafluence.cli import main

    if _loader.STATE.source != "prebuilt":
        pytest.skip(f"no prebuilt module in this install ({_loader.STATE.source})")
    assert main(["build"]) == 0
    assert "nothing to compile" in capsys.readouterr().out


@pytest.mark.slow
def test_sdist_and_wheel_install_into_a_fresh_venv(tmp_path):
    """``python -m build`` (default isolation), then a fresh venv with only a CPU torch: install
    the sdist, run the smoke test from outside the tree (compiles at first import); replace it
    by the wheel and run it again (the cached module is reused)."""
    times: dict[str, float] = {}
    env = _env(METAFLUENCE_CACHE_DIR=str(tmp_path / "cache"))
    before = _tree(REPO)

    start = time.perf_counter()
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", dist, REPO], cwd=tmp_path, env=env)
    times["build sdist+wheel"] = time.perf_counter() - start
    assert _tree(REPO) == before, "the build wrote into the source tree"
    (sdist,) = dist.glob("metafluence-*.tar.gz")
    (wheel,) = dist.glob("metafluence-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # pure: nothing tied to one torch

    start = time.perf_counter()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", TORCH_SPEC], cwd=tmp_path, env=env)
    times["venv + torch"] = time.perf_counter() - start

    start = time.perf_counter()
    log = _run([py, "-m", "pip", "install", sdist], cwd=tmp_path, env=env)
    times["pip install sdist"] = time.perf_counter() - start
    assert not re.search(r"^\s*(Collecting|Downloading) torch\b", log, re.M), log
    assert "Requirement already satisfied: torch" in log
    assert _run([py, "-m", "pip", "check"], cwd=tmp_path, env=env)
    version = _run([py, "-c", "import torch; print(torch.__version__)"], tmp_path, env)
    assert version.strip() == torch.__version__

    start = time.perf_counter()
    smoke = _run([py, "-m", "metafluence.smoke", "--require-native"], cwd=tmp_path, env=env)
    times["smoke (compiles)"] = time.perf_counter() - start
    assert "smoke OK" in smoke, smoke
    assert str(venv) in smoke and str(REPO) not in smoke  # the installed copy ran, not this tree
    assert smoke.count("compiling the native kernels for") == 1
    assert '"source": "jit"' in smoke and "NativeModuleWarning" not in smoke

    start = time.perf_counter()
    log = _run([py, "-m", "pip", "install", "--force-reinstall", "--no-deps", wheel], tmp_path, env)
    smoke = _run([py, "-m", "metafluence.smoke", "--require-native"], cwd=tmp_path, env=env)
    times["wheel reinstall + smoke (cached)"] = time.perf_counter() - start
    assert "smoke OK" in smoke and "compiling" not in smoke, smoke
    print("packaging timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
