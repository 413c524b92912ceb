"""benchmarks/detection_real.py: reads a Fashion-MNIST-layout IDX folder (never downloads), says
how to unpack the Debian package when the folder is missing, and explains every AUC below the
loss ranking's."""

from __future__ import annotations

import csv
import gzip
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "detection_real.py"
sys.path.insert(0, str(ROOT / "benchmarks"))


def idx_tree(root: Path, n_train: int = 300, n_test: int = 200) -> None:
    """Fashion-MNIST's four gzipped IDX files: 10 classes of noisy 28×28 prototypes."""
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, size=(10, 28, 28))
    root.mkdir(parents=True)
    for part, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = np.clip(protos[y] + rng.normal(0, 40, (n, 28, 28)), 0, 255).astype(np.uint8)
        with gzip.open(root / f"{part}-images-idx3-ubyte.gz", "wb") as f:
            f.write(np.array([0x803, n, 28, 28], ">u4").tobytes() + x.tobytes())
        with gzip.open(root / f"{part}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([0x801, n], ">u4").tobytes() + y.astype(np.uint8).tobytes())


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, METAFLUENCE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_detection_real_runs_on_an_idx_folder(tmp_path):
    data, out = tmp_path / "fashion-mnist", tmp_path / "out"
    idx_tree(data)
    proc = _run(
        ["--fashion-mnist", str(data), "--datasets", "fashion-mnist", "--tasks", "6",
         "--target", "3", "--check", "2", "--corruptions", "query", "--shots", "2",
         "--queries", "3", "--out", str(out)],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "detection_real.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["corruption"] for r in rows] == ["flipped query labels"]
    for r in rows:
        for k in ("auc_influence", "auc_loss", "auc_tracin", "auc_loo", "spearman_vs_loo"):
            assert 0.0 <= float(r[k]) <= 1.0 or k == "spearman_vs_loo", (k, r[k])
        assert math.isfinite(float(r["regime_expected_spearman"]))
        assert r["note"] and r["commit"] and r["torch"]
        assert (r["shots"], r["queries"]) == ("2", "3")  # --shots / --queries reach the tasks
    with (out / "tasks.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    assert "AUC loss ranking" in (out / "table.md").read_text()


def test_missing_folder_says_how_to_unpack_the_deb(tmp_path):
    proc = _run(["--fashion-mnist", str(tmp_path / "nowhere")], tmp_path)
    assert proc.returncode != 0
    assert "dpkg -x" in proc.stderr and "nothing is downloaded" in proc.stderr


def _row(**kw):
    base = {
        "auc_influence": 0.6,
        "auc_loss": 1.0,
        "auc_loo": 0.6,
        "spearman_vs_loo": 0.9,
        "loo_share_flipped_harmful": 0.4,
        "loo_mean_flipped": 1e-3,
        "loo_mean_clean": -1e-4,
        "truly_harmful": False,
    }
    return {**base, **kw}


def test_note_explains_every_auc_below_loss_ranking():
    from detection_real import note

    text = note(_row())
    assert "NOT truly harmful" in text and "below loss ranking" in text
    met = note(
        _row(auc_influence=0.97, auc_loo=0.99, truly_harmful=True, loo_share_flipped_harmful=1.0)
    )
    assert "met" in met and "first-order error" in met and "AUC 0.99" in met
    nonlinear = note(_row(auc_influence=0.9, auc_loo=0.92, truly_harmful=True))
    assert "MISSED" in nonlinear and "LOO effect separates them only at AUC 0.92" in nonlinear
    missed = note(_row(auc_influence=0.8, auc_loo=0.99, truly_harmful=True))
    assert "MISSED" in missed and "first-order error" in missed
    same = note(_row(auc_influence=1.0, auc_loss=1.0, truly_harmful=True))
    assert "below loss ranking" not in same
