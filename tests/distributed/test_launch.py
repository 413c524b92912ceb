"""``metafluence run --nproc N`` and under ``torchrun``: the 1-process numbers; failures stop all.

The job runs in float64 here: 2 ranks add per-shard partial sums in another order than one
process, so results agree to rounding (measured: every summary number within rel 1e-12 at this
size), far inside the rel 1e-8 checked. In float32 the same reordering gives ~1e-6 relative
differences, amplified by meta-training — not a test of the sharding.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metafluence import cli
from metafluence.distributed.launch import in_worker, launch

from ..test_run import TINY

pytestmark = pytest.mark.distributed

RUN = [*TINY, "--dtype", "float64"]
FILES = ("task_scores.csv", "support_point_scores.csv", "query_point_scores.csv")
SKIP = {"config", "stage_seconds", "wall_seconds", "seconds", "out", "processes"}
SELF = "tests.distributed.test_launch"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One tiny float64 run in this process (``--nproc 1``): its output folder."""
    try:
        from metafluence.data.glyphs import kanjivg_dir

        kanjivg_dir()
    except ImportError:
        pytest.skip("kanjivg is not installed")
    if sys.platform == "win32":
        pytest.skip("torch.distributed gloo workers on posix only")
    with pytest.MonkeyPatch.context() as mp:
        # the same cache as tests/test_run.py's fixture; spawned workers inherit it
        mp.setenv("METAFLUENCE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        out = tmp_path_factory.mktemp("launch")
        assert cli.main([*RUN, "--out", str(out), "--name", "one"]) == 0
        yield out


def close(a, b, path: str = "") -> None:
    """``a == b`` for JSON values, floats at rel 1e-8."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in SKIP:
                close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-8, abs_tol=1e-300), (path, a, b)
    else:
        assert a == b, (path, a, b)


def same_as_reference(ref: Path, got: Path, processes: int) -> None:
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((got / "summary.json").read_text())
    assert a["processes"] == 1 and b["processes"] == processes
    close(a, b)
    for name in FILES:
        ra = list(csv.reader(open(ref / name)))
        rb = list(csv.reader(open(got / name)))
        assert ra[0] == rb[0] and len(ra) == len(rb) > 1, name
        for x, y in zip(ra[1:], rb[1:], strict=True):
            for u, v in zip(x, y, strict=True):
                try:
                    fu, fv = float(u), float(v)
                except ValueError:
                    assert u == v, (name, x, y)
                else:  # the CSVs hold 9 significant digits
                    assert math.isclose(fu, fv, rel_tol=1e-8, abs_tol=1e-12), (name, x, y)
    assert f"({processes} processes," in (got / "report.md").read_text()


def test_nproc_2_equals_nproc_1(reference, capfd):
    out = reference.parent / (reference.name + "-nproc2")
    t = time.perf_counter()
    assert cli.main([*RUN, "--out", str(out), "--name", "two", "--nproc", "2"]) == 0
    print(f"--nproc 2: {time.perf_counter() - t:.1f} s")
    same_as_reference(reference / "one", out / "two", 2)
    # only rank 0 reports (the workers write to the inherited stdout)
    assert capfd.readouterr().out.count("report:") == 1


@pytest.mark.slow
def test_torchrun_equals_nproc_1(reference):
    out = reference.parent / (reference.name + "-torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "metafluence.cli", *RUN, "--out", str(out), "--name", "tr"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    same_as_reference(reference / "one", out / "tr", 2)


def test_failing_worker_stops_the_job(reference, capfd):
    # --out names a file: rank 0 (the only writer) fails at once, rank 1 goes on to the data
    # stage and waits for rank 0 in a collective; it must be stopped, not left waiting
    bad = reference.parent / "not-a-folder"
    bad.write_text("")
    t = time.perf_counter()
    rc = cli.main([*RUN, "--out", str(bad), "--name", "x", "--nproc", "2"])
    elapsed = time.perf_counter() - t
    err = capfd.readouterr().err
    assert rc == 1, err
    assert "worker rank 0 of 2 failed first (exit code 1): NotADirectoryError" in err
    assert "Traceback" in err and "the other workers were stopped" in err
    assert elapsed < 120, elapsed  # a hang would last the gloo timeout (30 min)


def worker(argv: list[str]) -> int:
    """``launch`` target: rank ``argv[0]`` fails (``raise`` or ``exit:N``), the others sleep."""
    rank = int(os.environ["RANK"])
    assert in_worker() and os.environ["WORLD_SIZE"] == "2"
    if rank == int(argv[0]):
        if argv[1].startswith("exit:"):
            return int(argv[1][5:])
        raise RuntimeError(f"rank {rank} fails on purpose\nsecond line")
    time.sleep(float(argv[2]))  # far longer than the test may take: it must be stopped
    return 0


@pytest.mark.parametrize(("how", "code"), [("raise", 1), ("exit:3", 3)])
def test_launch_stops_the_others(how, code, capfd):
    if sys.platform == "win32":
        pytest.skip("torch.distributed gloo workers on posix only")
    t = time.perf_counter()
    rc = launch(["1", how, "600"], 2, target=f"{SELF}:worker")
    elapsed = time.perf_counter() - t
    err = capfd.readouterr().err
    assert rc == code, err
    assert f"worker rank 1 of 2 failed first (exit code {code})" in err
    if how == "raise":
        assert "RuntimeError: rank 1 fails on purpose;" in err  # first line of the message
        assert "second line" in err and "in worker\n    raise RuntimeError" in err  # traceback
    assert elapsed < 120, elapsed
    assert not in_worker() and "METAFLUENCE_LAUNCH_ERRORS" not in os.environ


def test_launch_bad_arguments():
    with pytest.raises(ValueError, match="nproc"):
        launch([], 0)
    with pytest.raises(ValueError, match="target='nope'"):
        launch([], 2, target="nope")


def test_nproc_checks(tmp_path, monkeypatch, capsys):
    assert cli.main([*RUN, "--out", str(tmp_path), "--nproc", "0"]) == 2
    assert "argument --nproc: expected an integer >= 1, got '0'" in capsys.readouterr().err
    if torch.cuda.device_count() < 64:
        assert cli.main([*RUN, "--out", str(tmp_path), "--nproc", "64", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        # without a GPU, --device cuda itself is the error
        want = "needs one GPU per worker" if torch.cuda.is_available() else "no CUDA device"
        assert want in err, err
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert cli.main([*RUN, "--out", str(tmp_path), "--nproc", "2"]) == 2
    assert (
        "--nproc 2 but this process was launched as one of WORLD_SIZE=3" in capsys.readouterr().err
    )
