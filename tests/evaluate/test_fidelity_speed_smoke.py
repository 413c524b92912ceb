"""Smoke test of benchmarks/fidelity_speed.py: tiny sizes into tmp_path, both rules, all kinds."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity_speed.py"

KINDS = ("task", "support_point", "query_point")
COLUMNS = {
    "rule",
    "M",
    "kind",
    "steps",
    "epochs",
    "n_removed",
    "acc_base",
    "acc_edit",
    "acc_full",
    "acc_warm",
    "acc_full_alt",
    "gap_full_alt",
    "gap_edit_full",
    "t_score",
    "t_edit",
    "t_full",
    "t_warm",
    "speedup",
    "t_step",
    "t_hvp",
}
ALWAYS_FINITE = COLUMNS - {"rule", "kind", "acc_warm", "t_warm"}


def test_fidelity_speed_smoke(tmp_path: Path) -> None:
    tiny = "--steps 3 --retrain-steps 2 --width 8 --target-tasks 3 --eval-tasks 3"
    tiny += " --maxiter 2 --lanczos-steps 2 --epochs 6 --hvp-repeat 1"
    cmd = [sys.executable, str(SCRIPT), "--M", "6,10", "--points-M", "6", "--diag-M", "10"]
    cmd += ["--rules", "job,epochs"]
    cmd += [*tiny.split(), "--out", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=170)
    assert out.returncode == 0, out.stderr[-3000:]

    with (tmp_path / "fidelity_speed.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert COLUMNS <= set(reader.fieldnames or [])
        rows = list(reader)
    got = [(r["rule"], int(r["M"]), r["kind"]) for r in rows]
    # for each M, each rule: tasks, then the point kinds where M is in --points-M
    at6 = [(rule, 6, kind) for rule in ("job", "epochs") for kind in KINDS]
    assert got == [*at6, ("job", 10, "task"), ("epochs", 10, "task")]
    for r in rows:
        for c in ALWAYS_FINITE:
            assert math.isfinite(float(r[c])), (c, r)
        assert float(r["t_full"]) > 0 and float(r["t_score"]) > 0 and float(r["t_edit"]) > 0
        speed = float(r["t_full"]) / (float(r["t_score"]) + float(r["t_edit"]))
        assert math.isclose(float(r["speedup"]), speed, rel_tol=1e-9)
        gap = float(r["acc_edit"]) - float(r["acc_full"])
        assert math.isclose(float(r["gap_edit_full"]), gap, abs_tol=1e-12)
        warm = float(r["acc_warm"]), float(r["t_warm"])
        assert all(map(math.isfinite, warm)) == (r["kind"] == "task")
        M = int(r["M"])
        # the job's call (with diagnostics) is timed only for tasks at --diag-M
        diag = float(r["t_score_diag"]), float(r["speedup_diag"])
        assert all(map(math.isfinite, diag)) == (r["kind"] == "task" and M == 10)
        steps = 3 if r["rule"] == "job" else math.ceil(6 * M / 32)
        assert int(r["steps"]) == steps
        n = {"task": M, "support_point": 5 * M, "query_point": 25 * M}[r["kind"]]
        assert int(r["n_removed"]) == round(0.4 * n)
    assert (tmp_path / "fidelity_speed.png").stat().st_size > 0
    text = (tmp_path / "README.md").read_text()
    assert "| job | 6 | task |" in text and "| epochs | 10 | task |" in text
