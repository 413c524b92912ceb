"""``metafluence run``: every user error exits 2 with one line naming the option (issue 17);
a bug still shows its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from metafluence import cli

_NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

BAD = [
    (["--device", "tpu"], "--device"),
    (["--device", _NO_CUDA], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "two"], "--threads"),
    (["--ways", "1"], "--ways"),
    (["--shots", "0"], "--shots"),
    (["--tasks", "-5"], "--tasks"),
    (["--steps", "1.5"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--nproc", "0"], "--nproc"),
    (["--noise", "1.5"], "--noise"),
    (["--noise", "nan"], "--noise"),
    (["--inner-lr", "0"], "--inner-lr"),
    (["--outer-lr", "-1e-3"], "--outer-lr"),
    (["--damping", "inf"], "--damping"),
    (["--solve-damping", "-1"], "--solve-damping"),
    (["--glyph-classes", "2"], "--glyph-classes"),
    (["--model", "resnet"], "--model"),
    (["--dataset", "imagenet:/x"], "--dataset"),
    (["--dataset", "npz:"], "--dataset"),
    (["--dataset", "npz:/no/such/file.npz"], "--dataset"),
    (["--tasks", "10", "--remove", "11"], "--remove"),
]


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = cli.main(["run", *argv, "--quiet"])
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_user_error_is_one_line_exit_2(argv, option, capsys, tmp_path):
    rc, lines = _run([*argv, "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("metafluence run: error: ") and option in lines[0], lines[0]
    assert not (tmp_path / "results").exists()


def test_device_error_says_what_is_expected(capsys):
    rc, lines = _run(["--device", "tpu"], capsys)
    assert rc == 2 and "expected cpu, cuda, cuda:<index> or mps" in lines[0]
    rc, lines = _run(["--device", _NO_CUDA], capsys)
    assert rc == 2 and ("no CUDA device" in lines[0] or "visible" in lines[0])


def test_bad_data_values_exit_2_naming_the_file(tmp_path, capsys):
    """Float labels that are not whole numbers: exit 2 naming the file, not AUC 0.500."""
    f = tmp_path / "d.npz"
    x = np.random.default_rng(0).random((60, 8, 8)).astype(np.float32)
    np.savez(f, x=x, y=(np.arange(60) % 30) / 10.0)
    rc, lines = _run(["--dataset", f"npz:{f}", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert f"{f}[y]" in lines[0] and "fractional" in lines[0]


def test_threads_zero_keeps_torch_default():
    """``--threads 0`` is documented (torch's default), not an error."""
    assert cli.build_parser().parse_args(["run", "--threads", "0"]).threads == 0


def test_a_bug_in_validation_keeps_its_traceback(monkeypatch):
    """Only ValueError/TypeError from checking user input become exit 2; anything else is a
    bug and propagates."""
    import metafluence.data as data

    def broken(spec: str, must_exist: bool = False):
        raise KeyError("bug")

    monkeypatch.setattr(data, "parse_spec", broken)
    with pytest.raises(KeyError, match="bug"):
        cli.main(["run", "--quiet"])


def test_help_and_usage_errors_return_codes(capsys):
    assert cli.main(["run", "--help"]) == 0
    capsys.readouterr()
    assert cli.main(["bogus"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_real_process_exit_code_and_one_line():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "metafluence.cli", "run", "--threads", "-1"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--threads" in lines[0] and "Traceback" not in proc.stderr


def test_every_option_has_help():
    """Every option and positional of every subcommand (``metafluence run`` above all) says what
    it does in ``--help``."""
    import argparse

    from metafluence.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert "run" in subs.choices and len(subs.choices["run"]._actions) > 30
    assert not missing, f"options without help: {missing}"
