"""``metafluence run`` end to end at a tiny size, its determinism and its errors."""

from __future__ import annotations

import csv
import json
import math

import pytest

from metafluence import cli

TINY = [
    "run",
    "--tasks",
    "12",
    "--ways",
    "3",
    "--queries",
    "2",
    "--width",
    "4",
    "--steps",
    "4",
    "--retrain-steps",
    "2",
    "--target-tasks",
    "4",
    "--eval-tasks",
    "4",
    "--glyph-classes",
    "24",
    "--maxiter",
    "4",
    "--stationary-evals",
    "6",
    "--quiet",
]


@pytest.fixture
def glyph_cache(tmp_path_factory, monkeypatch):
    try:
        from metafluence.data.glyphs import kanjivg_dir

        kanjivg_dir()
    except ImportError:
        pytest.skip("kanjivg is not installed")
    monkeypatch.setenv("METAFLUENCE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_run_tiny_end_to_end_and_deterministic(tmp_path, glyph_cache, capsys):
    assert cli.main([*TINY, "--out", str(tmp_path), "--name", "a"]) == 0
    out = tmp_path / "a"
    for f in (
        "report.md",
        "report.html",
        "scores.png",
        "detection.png",
        "change.png",
        "gallery.png",
        "task_scores.csv",
        "support_point_scores.csv",
        "query_point_scores.csv",
        "summary.json",
    ):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    for needle in ("ROC AUC", "edited", "retrained", "Wall time per stage", "scores.png"):
        assert needle in md
    page = (out / "report.html").read_text()  # self-contained: every image embedded
    assert page.count('<img src="data:image/png;base64,') == 4 and 'src="detection.png"' not in page
    assert "The most harmful and the most helpful tasks" in md and 'src="gallery.png"' not in page
    mode = (out / "summary.json").stat().st_mode & 0o777
    assert mode == (out / "report.md").stat().st_mode & 0o777, oct(mode)
    rows = list(csv.DictReader(open(out / "task_scores.csv")))
    assert len(rows) == 12 and sum(int(r["label_flipped"]) for r in rows) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_seconds"]) >= {"data", "meta-train", "influence", "edit", "retrain"}
    assert 0.0 <= summary["detection"]["task_auc"] <= 1.0
    st = summary["stationarity"]  # the λ* phase ran, within its budget, and is reported
    assert 1 <= st["evaluations"] <= 6 and st["grad_norm_after"] <= st["grad_norm_before"]
    assert "after the stationarity phase" in md and "total solve for the target" in md
    # Conv-4's conv blocks feed GroupNorm: scale-invariant, so the damping sets a floor
    assert st["scale_invariant"] == ["body.0", "body.3", "body.6", "body.9"]
    assert 0 < st["radial_floor"] < st["grad_norm_after"] and "- floor: ‖∇F‖ ≥" in md
    assert "ranked by their own query loss" in md and "- tasks: " in md
    assert 0.0 <= summary["detection"]["task_auc_loss_baseline"] <= 1.0
    assert "TracIn at λ*" in md and 0.0 <= summary["detection"]["task_auc_tracin"] <= 1.0
    assert "have their support labels permuted" in md  # the default corruption
    assert summary["labels_changed"] == {"support": 2, "query": 0}
    d = summary["detection"]  # what the report's "why below the loss ranking" line reads
    assert 0 <= d["flipped_harmful_predicted"] <= d["n_flipped"] == 2
    assert math.isfinite(d["flipped_mean_effect"]) and math.isfinite(d["clean_mean_effect"])
    # the job's curvature: the stationarity phase's secant pairs (free), exact Hessian
    assert summary["secant_pairs"] >= 1
    assert (summary["curvature"]["method"], summary["curvature"]["curvature"]) == (
        "secant",
        "exact",
    )
    assert summary["diagnostics"]["lanczos_steps"] == 0  # spectrum from the fit, no pass
    assert "report:" in capsys.readouterr().out
    # same seed → identical scores
    assert cli.main([*TINY, "--out", str(tmp_path), "--name", "b"]) == 0
    assert (tmp_path / "a" / "task_scores.csv").read_text() == (
        tmp_path / "b" / "task_scores.csv"
    ).read_text()
    assert (tmp_path / "a" / "support_point_scores.csv").read_text() == (
        tmp_path / "b" / "support_point_scores.csv"
    ).read_text()


def test_run_bad_dataset_is_one_line_error(tmp_path, capsys):
    rc = cli.main(
        ["run", "--dataset", f"omniglot:{tmp_path / 'nope'}", "--out", str(tmp_path), "--quiet"]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "expected layout" in err and "images_background" in err
    rc = cli.main(["run", "--dataset", "imagenet:/x", "--out", str(tmp_path), "--quiet"])
    assert rc == 2 and "kind one of" in capsys.readouterr().err


def test_killed_run_resumes_from_its_last_stage_and_never_mixes_outputs(
    tmp_path, glyph_cache, monkeypatch
):
    """A run killed in the edit stage leaves the earlier report untouched and its finished
    stages in <out>/.<name>.partial; the rerun does not meta-train again, and its scores equal
    an uninterrupted run's. Stale files of an older run in <out>/<name> are gone afterwards."""
    import metafluence as mf

    args = [*TINY, "--out", str(tmp_path)]
    assert cli.main([*args, "--name", "whole"]) == 0
    final = tmp_path / "cut"
    final.mkdir()
    (final / "stale.png").write_bytes(b"old")
    real_edit, real_train = mf.edit, mf.train.meta_train

    def killed(*a, **k):
        raise KeyboardInterrupt("killed in the edit stage")

    monkeypatch.setattr(mf, "edit", killed)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*args, "--name", "cut"])
    assert (final / "stale.png").is_file() and not (final / "summary.json").exists()
    assert (tmp_path / ".cut.partial" / "stages").is_dir()
    monkeypatch.setattr(mf, "edit", real_edit)
    calls = []

    def counted(*a, **k):
        calls.append(k.get("steps"))
        return real_train(*a, **k)

    monkeypatch.setattr(mf.train, "meta_train", counted)
    assert cli.main([*args, "--name", "cut"]) == 0
    assert calls == [2, 2]  # only the retrain and the control ran: λ* came from the store
    assert not (final / "stale.png").exists() and (final / "summary.json").is_file()
    assert not (tmp_path / ".cut.partial").exists()
    for f in ("task_scores.csv", "support_point_scores.csv", "query_point_scores.csv"):
        assert (final / f).read_text() == (tmp_path / "whole" / f).read_text(), f
    a = json.loads((final / "summary.json").read_text())
    b = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert a["evaluation"] == b["evaluation"]
    a["stationarity"].pop("seconds"), b["stationarity"].pop("seconds")
    assert a["stationarity"] == b["stationarity"]


def test_run_without_stationarity_falls_back_to_krylov(tmp_path, glyph_cache):
    """No stationarity phase → no secant pairs: the job's curvature falls back to Krylov CG on
    the configured kind, and the report's warnings say so."""
    args = [*TINY, "--out", str(tmp_path), "--name", "n", "--stationary-tol", "none", "--quiet"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "n" / "summary.json").read_text())
    assert (summary["curvature"]["method"], summary["curvature"]["curvature"]) == (
        "krylov",
        "gauss_newton",
    )
    assert summary["secant_pairs"] is None
    assert any("no secant pairs" in w for w in summary["warnings"])


def test_run_flips_query_labels_when_asked(tmp_path, glyph_cache):
    """``--flip query``: the flipped tasks' query labels are permuted instead of their support
    labels, and the report and summary say which."""
    args = [*TINY, "--out", str(tmp_path), "--name", "q", "--flip", "query", "--quiet"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["config"]["flip"] == "query" and summary["detection"]["n_flipped"] == 2
    assert summary["labels_changed"] == {"support": 0, "query": 2}  # read off the tasks
    md = (tmp_path / "q" / "report.md").read_text()
    assert "have their query labels permuted" in md
    assert 0.0 <= summary["detection"]["task_auc_tracin"] <= 1.0


def _detection(auc: float, harmful: int, flipped_mean: float, clean_mean: float) -> dict:
    return {
        "task_auc": auc,
        "task_auc_loss_baseline": 0.99,
        "n_flipped": 8,
        "flipped_harmful_predicted": harmful,
        "flipped_mean_effect": flipped_mean,
        "clean_mean_effect": clean_mean,
    }


def test_report_says_why_task_scores_rank_below_the_loss_ranking():
    """Below the loss ranking the report says why, from what influence predicts for the
    flipped tasks; at or above it, nothing."""
    from metafluence.report.render import _below_loss_ranking

    assert _below_loss_ranking(_detection(0.98, 2, 0.01, -0.002)) == ""  # as good: no line
    not_harmful = _below_loss_ranking(_detection(0.72, 3, 0.004, -0.001))
    assert "3 of the 8 flipped tasks are predicted harmful" in not_harmful
    assert "does not call them harmful" in not_harmful and "leave_one_out" in not_harmful
    on_average = _below_loss_ranking(_detection(0.72, 5, -0.001, 0.0003))
    assert "more harmful than the clean tasks on average but not one by one" in on_average
    harmful = _below_loss_ranking(_detection(0.80, 7, -0.02, -0.001))
    assert "7 of the 8" in harmful and "they are predicted harmful" in harmful
    assert _below_loss_ranking({"task_auc": 0.5, "task_auc_loss_baseline": 0.9}) == ""  # old
