"""benchmarks/job_floor.py end to end at a tiny size: the radial floor of the job's Conv-4 is
measured where it should be (radial part of ∇F = δ‖w_b‖ on every conv block), the exempt
phase runs on the objective without the conv blocks' damping, and the JSON says what ran."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def job_floor():
    sys.path.insert(0, str(BENCH))
    try:
        import job_floor

        yield job_floor
    finally:
        sys.path.remove(str(BENCH))


def test_floor_and_exempt_phase(job_floor, tmp_path):
    args = ["--M", "6", "--steps", "2", "--evals", "2", "--more", "3", "--exempt"]
    args += ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]
    assert job_floor.main(args) == 0
    (path,) = tmp_path.glob("floor-*.json")
    row = json.loads(path.read_text())
    at = row["at_lambda"]
    assert at["scale_invariant"] == ["body.0", "body.3", "body.6", "body.9"]
    assert len(at["blocks"]) == 4 and at["grad_norm"] >= at["radial_floor"] > 0
    for b in at["blocks"]:  # Euler: the damping is the whole radial part
        assert b["radial"] == pytest.approx(b["damping_norm"], rel=1e-2)
    assert at["radial_floor"] == pytest.approx(
        sum(b["damping_norm"] ** 2 for b in at["blocks"]) ** 0.5, rel=1e-6
    )
    assert row["exempt_parameters"] == 28_064 and row["more_report"]["evaluations"] <= 3
    # the exempt objective has no damping on those blocks: its phase sees no floor
    assert row["more_report"]["scale_invariant"] == [] and "after" in row
