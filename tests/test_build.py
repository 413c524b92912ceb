"""Build information, the loader's fallbacks and the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import metafluence as mf
from metafluence import _loader


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env}
    full_env.pop("METAFLUENCE_BACKEND", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_build_info_reports_kernels():
    info = mf.build_info()
    for key in ("version", "torch_runtime", "torch_built", "cuda", "kernels", "missing"):
        assert key in info
    assert info["version"] == mf.__version__
    assert info["torch_runtime"] == torch.__version__
    assert info["native"]["loaded"], info["native"]["reason"]
    assert info["torch_built"] == torch.__version__
    assert info["kernels"]["cpu"] is True
    assert "psg" in info["kernel_families"]
    assert info["kernels"]["triton"] is (shutil.which("true") is not None and _has_triton())
    if torch.version.cuda is None and shutil.which("nvcc"):
        assert info["cuda"]["status"] == "compile-only"
        assert info["kernels"]["cuda"] == "compile-only"
        assert info["cuda"]["version"]
        assert "cuda" in info["missing"]
    if torch.version.cuda and info["cuda"]["status"] == "built":
        assert info["kernels"]["cuda"] is True
    json.dumps(info, default=str)  # serialisable for `metafluence info --json`


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def test_c_module_build_info_matches_config():
    assert _loader.STATE.module is not None, _loader.STATE.reason
    c_info = _loader.STATE.module.build_info()
    assert c_info["torch_version"] == _loader.STATE.config["TORCH_VERSION"]
    assert c_info["cuda_mode"] == _loader.STATE.config["CUDA_MODE"]
    assert c_info["compiler"]


DISABLED = r"""
import sys, torch, metafluence as mf
from metafluence import _loader
assert "metafluence._C" not in sys.modules
assert not _loader.STATE.loaded
info = mf.build_info()
assert info["kernels"]["cpu"] is False and "METAFLUENCE_DISABLE_C" in info["missing"]["cpu"]
a, g = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
from metafluence.ops import _dispatch
checks = _dispatch.REGISTRY["psg_linear"]
assert _dispatch.select_backend("psg_linear", checks, a.device, a.dtype) == "reference"
assert torch.allclose(mf.psg_linear(a, g), torch.einsum("nto,nti->noi", g, a))
print("OK")
"""


def test_without_compiled_module_uses_reference():
    proc = _run_python(DISABLED, METAFLUENCE_DISABLE_C="1")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_without_compiled_module_native_request_explains():
    code = (
        "import torch, metafluence as mf\n"
        "mf.psg_linear(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))\n"
    )
    proc = _run_python(code, METAFLUENCE_DISABLE_C="1", METAFLUENCE_BACKEND="native")
    assert proc.returncode != 0
    assert "BackendUnavailableError" in proc.stderr
    assert "native: rejected: compiled module not loaded" in proc.stderr
    assert "METAFLUENCE_DISABLE_C=1" in proc.stderr
    assert "reference: available" in proc.stderr
    assert "triton:" in proc.stderr


def test_torch_version_mismatch_is_reported_once_with_the_fix(tmp_path):
    """A prebuilt module for another torch is never imported; with compiling at first use
    turned off (METAFLUENCE_JIT=0) that is said once, with the commands that fix it."""
    code = (
        "import sys, torch\n"
        "torch.__version__ = '9.9.9'\n"
        "import metafluence as mf\n"
        "assert 'metafluence._C' not in sys.modules\n"
        "print(mf.build_info()['native']['reason'])\n"
        "print(mf.psg_linear(torch.ones(1, 1, 2), torch.ones(1, 1, 3)).shape)\n"
    )
    proc = _run_python(code, METAFLUENCE_JIT="0", METAFLUENCE_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    built = _loader.STATE.config["TORCH_VERSION"]
    assert f"built for torch {built}, running 9.9.9" in proc.stdout
    assert "Fix: compile it with: metafluence build" in proc.stdout
    assert "make install (pip install --no-build-isolation -e .)" in proc.stdout
    assert proc.stderr.count("NativeModuleWarning") == 1, proc.stderr
    assert f"built for torch {built}, running 9.9.9" in proc.stderr
    assert "torch.Size([1, 3, 2])" in proc.stdout


# ---- command line ---------------------------------------------------------------------------
def test_cli_info(capsys):
    from metafluence.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch runtime" in out and "kernels" in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kernels"]["cpu"] is True


def test_cli_bench(monkeypatch, capsys):
    from metafluence import cli

    # unknown family: a one-line argparse error naming the choices, exit code 2
    assert cli.main(["bench", "no-such-family"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(cli, "_benchmarks_dir", lambda: None)
    assert cli.main(["bench", "solvers"]) == 2
    assert "benchmarks/ not found" in capsys.readouterr().err


def test_cli_demo(capsys):
    from metafluence.cli import main

    assert main(["demo", "--samples", "7"]) == 0
    assert "demo OK" in capsys.readouterr().out


def test_console_script():
    exe = shutil.which("metafluence", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "metafluence" in proc.stdout
