"""LDS, detection AUC and recall@k on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import metafluence as mf
from metafluence.evaluate import detection


def test_lds_hand_values_and_signs():
    scores = torch.tensor([1.0, 2.0, 4.0])
    removed = torch.tensor([[0, 1], [1, 2], [0, 2]])  # predicted Δf = 3, 6, 5
    gt = torch.tensor([0.1, 0.9, 0.5])
    pred = mf.evaluate.lds_predictions(scores, removed)
    assert pred.flatten().tolist() == [3.0, 6.0, 5.0]
    assert mf.evaluate.lds(scores, gt, removed)["lds"] == pytest.approx(1.0)
    # the same subsets read as *kept* halves: prediction = −Σ_kept score → ρ = −1
    assert mf.evaluate.lds(scores, gt, removed, subsets="kept")["lds"] == pytest.approx(-1.0)
    # kept subsets {2}, {0}, {1} are the complements of the removed pairs → ρ = +1 again
    kept = torch.tensor([[2], [0], [1]])
    assert mf.evaluate.lds(scores, gt, kept, subsets="kept")["lds"] == pytest.approx(1.0)


def test_lds_multi_target_mean():
    scores = torch.tensor([[1.0, -1.0], [2.0, 0.0], [4.0, 3.0]])
    removed = torch.tensor([[0, 1], [1, 2], [0, 2]])
    # target 0: preds 3, 6, 5; target 1: preds -1, 3, 2
    gt = torch.tensor([[0.1, 0.3], [0.9, 0.2], [0.5, 0.1]])
    out = mf.evaluate.lds(scores, gt, removed)
    assert out["per_target"][0] == pytest.approx(1.0)
    # ranks (1,3,2) vs (3,2,1): Σd² = 6, ρ = 1 − 6·6/(3·8) = −0.5
    assert out["per_target"][1] == pytest.approx(-0.5)
    assert out["lds"] == pytest.approx(0.25)


def test_random_subsets_shape_and_seed():
    a = mf.evaluate.random_subsets(10, 7, 0.5, seed=3)
    assert a.shape == (7, 5)
    assert torch.equal(a, mf.evaluate.random_subsets(10, 7, 0.5, seed=3))
    assert all(len(set(r.tolist())) == 5 for r in a)


def test_detection_auc_recall_hand_values():
    scores = torch.tensor([-3.0, -1.0, 0.0, 2.0])  # harmful = most negative first
    flipped = torch.tensor([True, False, True, False])
    c = mf.evaluate.detection_curve(scores, flipped)
    assert c["recall"].tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert c["fpr"].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert mf.evaluate.detection_auc(scores, flipped) == pytest.approx(0.75)  # 3 of 4 pairs
    assert mf.evaluate.recall_at_k(scores, flipped, 1) == pytest.approx(0.5)
    assert mf.evaluate.recall_at_k(scores, flipped, 3) == pytest.approx(1.0)
    assert mf.evaluate.recall_at_k(scores, flipped, 0.5) == pytest.approx(0.5)
    assert detection.precision_at_k(scores, flipped, 2) == pytest.approx(0.5)
    # larger = more suspicious (e.g. a loss): reversed order
    assert mf.evaluate.detection_auc(-scores, flipped, harmful_first=False) == pytest.approx(0.75)
    # perfect and worst rankings; per-task lists are flattened
    assert (
        mf.evaluate.detection_auc(
            [torch.tensor([-2.0, 1.0]), torch.tensor([-1.0, 3.0])],
            [torch.tensor([1, 0]), torch.tensor([1, 0])],
        )
        == 1.0
    )
    assert (
        mf.evaluate.detection_auc(-torch.tensor([-2.0, -1.0, 1.0]), torch.tensor([1, 1, 0])) == 0.0
    )
    assert math.isnan(mf.evaluate.recall_at_k(scores, torch.zeros(4, dtype=torch.bool), 2))


def test_plots_write_png(tmp_path):
    p = mf.evaluate.plots.scatter_pred_vs_actual(
        {"a": (torch.randn(5), torch.randn(5))}, tmp_path / "s.png"
    )
    c = mf.evaluate.detection_curve(torch.randn(6), torch.tensor([1, 0, 0, 1, 0, 0]))
    q = mf.evaluate.plots.detection_plot({"x": c}, tmp_path / "d.png")
    assert p.stat().st_size > 0 and q.stat().st_size > 0


def test_detection_ties_count_half_and_report_agrees():
    """Ties: Mann-Whitney with average ranks (½ per tied pair), independent of item order; the
    report's names give the same numbers (harm = −removal effect)."""
    from metafluence.report import metrics as report_metrics

    scores = torch.tensor([-1.0, -1.0, -1.0, 0.0])  # three tied most-harmful items
    flipped = torch.tensor([False, True, False, True])
    # pairs (flipped, clean): (1, 0) tie ½, (1, 2) tie ½, (3, 0) 0, (3, 2) 0 → 1/4
    assert mf.evaluate.detection_auc(scores, flipped) == pytest.approx(0.25)
    assert mf.evaluate.detection_auc(scores.flip(0), flipped.flip(0)) == pytest.approx(0.25)
    c = mf.evaluate.detection_curve(scores, flipped)
    assert float(torch.trapezoid(c["recall"], c["fpr"])) == pytest.approx(0.25)
    # the tied group holds 1 of 2 flipped items: recall grows by ⅓·½ per item inspected in it
    assert mf.evaluate.recall_at_k(scores, flipped, 1) == pytest.approx(1 / 6)
    assert mf.evaluate.recall_at_k(scores, flipped, 3) == pytest.approx(0.5)
    assert report_metrics.roc_auc(-scores, flipped) == mf.evaluate.detection_auc(scores, flipped)
    assert report_metrics.recall_at_k(-scores, flipped, 1) == pytest.approx(1 / 6)
