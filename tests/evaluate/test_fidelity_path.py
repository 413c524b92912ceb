"""benchmarks/fidelity.py on a user-supplied dataset path (``--data omniglot:PATH``).

A tiny Omniglot-layout tree (3 alphabets × 4 characters × 20 drawings per part) stands in for a
user's copy; the run must read it, score, edit, retrain and write its tables.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[2]


def omniglot_tree(root: Path, alphabets=("Latin", "Greek", "Korean"), chars=4) -> None:
    rng = np.random.default_rng(0)
    for part in ("images_background", "images_evaluation"):
        for a in alphabets:
            for c in range(1, chars + 1):
                proto = rng.random((20, 20)) > 0.5  # one "character": a random ink pattern
                for r in range(1, 21):
                    noisy = proto ^ (rng.random((20, 20)) > 0.9)
                    path = root / part / f"{part[7:]}_{a}" / f"character{c:02d}"
                    path.mkdir(parents=True, exist_ok=True)
                    img = np.where(noisy, 0, 255).astype(np.uint8)
                    PIL.fromarray(img, mode="L").save(path / f"0{c}01_{r:02d}.png")


def test_fidelity_runs_on_an_omniglot_path(tmp_path):
    data = tmp_path / "omniglot"
    omniglot_tree(data)
    out = tmp_path / "out"
    env = dict(os.environ, METAFLUENCE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "fidelity.py"),
        "--data", f"omniglot:{data}", "--subset", "--ways", "2", "--shots", "1", "--queries", "2",
        "--tasks", "8", "--target", "4", "--test", "6", "--hidden", "3",
        "--only", "a", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "fidelity_removal.csv").open() as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert {"influence (ours)", "direct_if", "tracin", "loss", "random"} <= methods
    for r in rows:
        assert math.isfinite(float(r["acc_edit"])) and 0.0 <= float(r["acc_edit"]) <= 1.0
    assert f"omniglot:{data}" in (out / "fidelity_tables.md").read_text()
