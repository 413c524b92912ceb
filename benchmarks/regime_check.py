"""Does the Newton check (``removal_effects(newton_check=8)``) predict how well influence tracks
retraining? Collects its ``expected_spearman`` and the measured Spearman from the fidelity runs
under ``benchmarks/results/fidelity_check/`` into one table and plot.

    python benchmarks/regime_check.py     # reads the committed CSVs, writes regime_check.{csv,png}

Each row: one influence run (problem × curvature × δ'); ``actual`` is Spearman against the truth
the scores predict (plain leave-one-out for δ' = 0, the proximal response at the same δ'
otherwise); the verdicts are the check's own (``nonlinear``, as the fidelity runs recorded it:
expected < 0.9, or at least half its retrains ended above ``RETRAIN_RESIDUAL``;
``residual_max`` its largest retrain residual, ``unfinished`` of ``checked`` how many ended
above it) and the condition number rule (condition > 1e3 → ill-conditioned), each right when
it agrees with actual ≥ 0.9.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS_DIR  # noqa: E402

HERE = RESULTS_DIR / "fidelity_check"
TRACK = 0.9


def rows() -> list[dict]:
    out = []
    for name in ("toy_d1e-3", "toy_d1e-2", "glyph"):
        with (HERE / name / "fidelity_tasks.csv").open() as f:
            for r in csv.DictReader(f):
                if not r.get("newton_expected_spearman"):
                    continue  # baselines
                dp = float(r["solve_damping"])
                truth = "plain LOO" if dp == 0 else f"proximal δ'={dp:g}"
                out.append(
                    {
                        "run": f"{name} (d), M={r['M']}",
                        "curvature": r["curvature"],
                        "solve_damping": dp,
                        "condition": float(r["lambda_max"]) / float(r["lambda_min"]),
                        "expected": float(r["newton_expected_spearman"]),
                        "actual": float(r[f"spearman[{truth}]"]),
                        "n_truth": int(r["M"]),
                        **_verdict(r),
                    }
                )
    for folder in ("toy_map", "toy_map_widths"):
        out += _map_rows(HERE / folder / "fidelity_map.csv")
    for r in out:
        tracks = r["actual"] >= TRACK
        r["check_right"] = (not r["nonlinear"]) == tracks
        if r["solve_damping"] == 0:
            r["condition_right"] = (r["condition"] <= 1e3) == tracks
        else:
            r["condition_right"] = ""  # the condition rule says "proximal" for δ' > 0
    return out


def _verdict(r: dict) -> dict:
    """The check's verdict as the run recorded it (``nonlinear``: :func:`is_nonlinear` of
    ``metafluence.influence.regime``), its largest retrain residual and how many of its retrains
    were unfinished of how many checked, from a fidelity CSV row."""
    return {
        "residual_max": float(r["newton_residual_max"]),
        "unfinished": int(r["newton_unfinished"]),
        "checked": int(r["newton_checked"]),
        "nonlinear": r["newton_nonlinear"] == "True",
    }


def _map_rows(path: Path) -> list[dict]:
    out = []
    with path.open() as f:
        for r in csv.DictReader(f):
            out.append(
                {
                    "run": f"toy map, width {r['width']}, M={r['M']}, δ={float(r['damping']):g}",
                    "curvature": "exact",
                    "solve_damping": 0.0,
                    "condition": float(r["condition"]),
                    "expected": float(r["newton_expected_spearman"]),
                    "actual": float(r["spearman_plain"]),
                    "n_truth": int(float(r["n_items"])),
                    **_verdict(r),
                }
            )
    return out


def main() -> None:
    table = rows()
    with (HERE / "regime_check.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for dp, mk in ((0.0, "o"), (0.01, "s"), (0.1, "^")):
        pts = [r for r in table if r["solve_damping"] == dp]
        ax.scatter(
            [r["expected"] for r in pts],
            [r["actual"] for r in pts],
            marker=mk,
            label=f"δ'={dp:g}" + (" (vs plain LOO)" if dp == 0 else " (vs proximal)"),
        )
    ax.plot([-0.2, 1], [-0.2, 1], color="grey", lw=0.8)
    ax.axhline(TRACK, color="grey", ls=":", lw=0.8)
    ax.axvline(TRACK, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("Newton check: expected Spearman (8 items)")
    ax.set_ylabel("measured Spearman against retraining")
    ax.set_title("regime check vs measurement")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(HERE / "regime_check.png", dpi=120)
    n0 = [r for r in table if r["solve_damping"] == 0]
    miss = [r for r in n0 if not r["nonlinear"] and r["actual"] < TRACK]
    alarm = [r for r in n0 if r["nonlinear"] and r["actual"] >= TRACK]
    cmiss = [r for r in n0 if r["condition"] <= 1e3 and r["actual"] < TRACK]
    calarm = [r for r in n0 if r["condition"] > 1e3 and r["actual"] >= TRACK]
    err = sorted(abs(r["expected"] - r["actual"]) for r in table)
    print(
        f"{len(table)} runs, |expected − actual| median {err[len(err) // 2]:.3f}; δ'=0 runs: "
        f"{len(n0)}: check right {sum(r['check_right'] for r in n0)} ({len(miss)} misses, "
        f"{len(alarm)} false alarms), condition rule right "
        f"{sum(bool(r['condition_right']) for r in n0)} ({len(cmiss)} misses, "
        f"{len(calarm)} false alarms)"
    )


if __name__ == "__main__":
    main()
