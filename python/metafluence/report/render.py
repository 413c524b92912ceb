"""Write the run report: Markdown, HTML (same content, images embedded), PNGs, CSVs."""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..evaluate import detection, plots
from ..train.stationary import floor_note


def _plots(out: Path, summary: dict, task_scores: Tensor, mask: Tensor, sup: Tensor) -> list[str]:
    """The report's figures, drawn by :mod:`metafluence.evaluate.plots`: score histograms
    (tasks, support points), detection (ROC and recall curve of the tasks) and the change of the
    target after removing the ``k`` most harmful tasks."""
    m = mask.bool()
    sup_mask = m[:, None].expand_as(sup)
    plots.score_histograms(
        [
            {
                "scores": task_scores,
                "flagged": m,
                "title": "Tasks",
                "xlabel": "task removal effect (< 0: harmful)",
                "ylabel": "tasks",
                "labels": ("clean ({n})", "label-flipped ({n})"),
            },
            {
                "scores": sup,
                "flagged": sup_mask,
                "title": "Support points",
                "xlabel": "support-point removal effect",
                "ylabel": "points",
                "labels": ("in clean tasks", "in flipped tasks"),
            },
        ],
        out / "scores.png",
    )
    curve = detection.detection_curve(task_scores, m)  # most negative removal effect first
    plots.detection_plot(
        {"removal effect": curve},
        out / "detection.png",
        "flipped tasks",
        roc=True,
        positive_rate=float(m.double().mean()),
        items="tasks",
    )
    ev = summary["evaluation"]
    models = [k for k in ev if k != "initial"]
    plots.change_plot(
        summary["target_change"],
        {k: (ev[k]["target"]["accuracy"], ev[k]["test"]["accuracy"]) for k in models},
        out / "change.png",
        f"Removing the {summary['detection']['k']} most harmful tasks: predicted vs actual",
    )
    return ["scores.png", "detection.png", "change.png"]


GALLERY_TASKS = 3  # most harmful and most helpful tasks shown in the gallery


def _gallery(
    out: Path,
    problem: Any,
    meta_params: Any,
    tasks: list | None,
    task_scores: Tensor,
    sup: Tensor,
    mask: Tensor,
) -> list[str]:
    """``gallery.png``: the :data:`GALLERY_TASKS` most harmful tasks (most negative removal
    effect) and the most helpful ones, each with its support images (in a harmful task its most
    harmful support point, if its effect is negative, framed red) and its first query images,
    captioned ``given label → label predicted by the model adapted to that task``; a task whose
    labels were flipped (``mask``) says so. Nothing when the inputs are not images
    ``[n, C, H, W]`` or the problem is sharded over processes (its adaptation is collective)."""
    import torch

    if problem is None or tasks is None or problem.reduce.world > 1 or not len(tasks):
        return []
    if tasks[0].support[0].dim() != 4:
        return []
    order = torch.argsort(task_scores, stable=True).tolist()
    k = min(GALLERY_TASKS, len(order) // 2 or 1)
    chosen = [(i, "harmful") for i in order[:k]] + [
        (i, "helpful") for i in order[::-1][:k] if i not in order[:k]
    ]
    adapted = problem.adapt(meta_params, [tasks[i] for i, _ in chosen])
    rows = []
    with torch.no_grad():
        for (i, kind), params in zip(chosen, adapted, strict=True):
            t = tasks[i]
            (xs, ys), (xq, yq) = t.support, t.query
            full = dict(params)

            def predict(x: Tensor, full: dict = full) -> Tensor:
                x = x.to(next(iter(full.values())).dtype)
                return problem.fm.call(problem.model, full, x).argmax(-1).cpu()

            s_i = sup[i]
            harmful = (s_i < 0) & (s_i == s_i.min()) if kind == "harmful" else None
            rows.append(
                {
                    "title": f"{kind}: task {t.id} (removal effect {float(task_scores[i]):+.3g})"
                    + (", labels flipped" if bool(mask[i]) else ""),
                    "support_x": xs.cpu(),
                    "support_y": ys.cpu(),
                    "support_pred": predict(xs),
                    "support_harmful": harmful,
                    "query_x": xq.cpu(),
                    "query_y": yq.cpu(),
                    "query_pred": predict(xq),
                }
            )
    plots.task_gallery(rows, out / "gallery.png")
    return ["gallery.png"]


def _csvs(out: Path, ids, classes, task_scores, mask, sup, qry) -> list[str]:
    order = np.argsort(task_scores.numpy(), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    with open(out / "task_scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task_id", "removal_effect", "harm_rank", "label_flipped", "classes"])
        for i, tid in enumerate(ids):
            w.writerow(
                [
                    tid,
                    f"{float(task_scores[i]):.9g}",
                    int(rank[i]) + 1,
                    int(mask[i]),
                    " ".join(classes[i]),
                ]
            )
    for name, arr in (("support_point_scores.csv", sup), ("query_point_scores.csv", qry)):
        with open(out / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["task_id", "point", "removal_effect", "in_flipped_task"])
            for i, tid in enumerate(ids):
                for j in range(arr.shape[1]):
                    w.writerow([tid, j, f"{float(arr[i, j]):.9g}", int(mask[i])])
    return ["task_scores.csv", "support_point_scores.csv", "query_point_scores.csv"]


def _auc_verdict(auc: float, baseline: float | None) -> str:
    """How an AUC compares with chance (0.5) and with the loss-ranking baseline."""
    if auc != auc:
        return "not defined (one class only)"
    if abs(auc - 0.5) < 0.05:
        head = "at chance: these scores do not find the injected noise"
    elif auc < 0.5:
        head = "below chance: the noisy items look helpful to the target"
    else:
        head = "above chance"
    if baseline is None or baseline != baseline:
        return head
    rel = (
        "better than" if auc > baseline + 0.02 else "worse than" if auc < baseline - 0.02 else "as"
    )
    tail = " good as" if rel == "as" else ""
    return f"{head}; {rel}{tail} ranking by loss ({baseline:.3f})"


def _auc_lines(d: dict) -> list[str]:
    """One interpretation line per detection AUC (and, for tasks ranked below the loss
    ranking, why: :func:`_below_loss_ranking`)."""
    base = d.get("task_auc_loss_baseline")
    lines = [f"- tasks: {_auc_verdict(d['task_auc'], base)}."]
    why = _below_loss_ranking(d)
    if why:
        lines.append(f"  {why}")
    return [
        *lines,
        f"- support points: {_auc_verdict(d['support_point_auc'], None)}.",
        f"- query points: {_auc_verdict(d['query_point_auc'], None)}.",
    ]


def _below_loss_ranking(d: dict) -> str:
    """Why the task scores find the flipped tasks worse than ranking by loss (empty when they
    do not): the loss ranking reads how badly a task fits, influence what removing it would do
    to the target, and a flipped task need not be harmful to the target. Says how many of the
    flipped tasks influence predicts harmful and their mean removal effect against the clean
    tasks'."""
    auc, base = d.get("task_auc"), d.get("task_auc_loss_baseline")
    if auc is None or base is None or not auc < base - 0.02:
        return ""
    if "flipped_harmful_predicted" not in d:
        return ""
    n, h = d["n_flipped"], d["flipped_harmful_predicted"]
    fm, cm = d["flipped_mean_effect"], d["clean_mean_effect"]
    check = "check with `mf.evaluate.leave_one_out` whether the flipped tasks truly hurt the target"
    if h >= 0.75 * n and fm < cm:
        verdict = (
            "they are predicted harmful, so the scores rank them below the loss ranking "
            "through the clean tasks they also call harmful; check the harm by retraining "
            "(`mf.evaluate.leave_one_out`) before acting on either ranking"
        )
    elif fm < cm:
        verdict = (
            "influence predicts them more harmful than the clean tasks on average but not one "
            "by one: the loss ranking finds labels that fit badly, influence finds tasks whose "
            "removal would lower the target loss, and a flipped task the meta-learner absorbs "
            f"need not hurt the target ({check})"
        )
    else:
        verdict = (
            "so influence does not call them harmful to the target as a group: the loss "
            "ranking finds labels that fit badly, influence finds tasks whose removal would "
            f"lower the target loss, and here these are not the same tasks ({check})"
        )
    return (
        f"Why below the loss ranking: {h} of the {n} flipped tasks are predicted harmful "
        f"(mean removal effect {fm:+.3g}, clean tasks {cm:+.3g}); {verdict}."
    )


def _edit_vs_control(ch: dict) -> str:
    """One line: where the edit's change of the target lies between the continued-training
    control (0%) and retraining (100%)."""
    if "continued" not in ch:
        return "(no continued-training control was run)"
    gap = ch["retrained"] - ch["continued"]
    if abs(gap) < 1e-12:
        return "Retraining and the continued-training control end at the same target loss."
    frac = (ch["edited"] - ch["continued"]) / gap
    if frac < 0.5:
        verdict = "it cannot be told apart from training a little longer"
    elif frac <= 1.5:
        verdict = "it tracks retraining, clearly beyond training a little longer"
    else:
        verdict = (
            "it overshoots: the edit moves the target further from the control than retraining "
            "does (retraining and the first-order edit disagree in sign or size)"
        )
    return (
        f"On the scale control = 0%, retrained = 100%, the edit stands at {100 * frac:.0f}% "
        f"(edit {ch['edited']:+.4f}, retrained {ch['retrained']:+.4f}, control "
        f"{ch['continued']:+.4f}): {verdict}."
    )


def _reliability(summary: dict) -> list[str]:
    """Lines on λ*'s stationarity, the solve (labelled by purpose) and the spectrum."""
    out = []
    st = summary.get("stationarity")
    if st:
        state = "reached" if st["converged"] else "**not reached**"
        out.append(
            f"- λ*: ‖∇F‖ {st['grad_norm_before']:.3g} after first-order training → "
            f"{st['grad_norm_after']:.3g} after the stationarity phase (L-BFGS, tolerance "
            f"{st['tol']:.3g} {state}; {st['evaluations']} full gradients, "
            f"{st['seconds']:.1f} s; F {st['objective_before']:.4g} → {st['objective_after']:.4g})."
        )
        if st.get("scale_invariant"):
            rest = max(st["grad_norm_after"] ** 2 - st["radial_floor"] ** 2, 0.0) ** 0.5
            out.append(
                f"- floor: {floor_note(st['radial_floor'], st['scale_invariant'])}. The rest "
                f"of the gradient, (‖∇F‖² − floor²)^½ = {rest:.3g}, is what separates λ* from "
                "a stationary point of the function the model computes; the floor is the "
                "damping pulling those weights to 0."
            )
    else:
        out.append(
            f"- λ*: ‖∇F(λ*)‖ = {summary['meta_grad_norm']:.3g} (no stationarity phase: the "
            "formulas assume ∇F = 0)."
        )
    sv = summary.get("solve", {})
    if "iters" in sv:
        state = "converged" if sv.get("converged") else "**did not converge**"
        out.append(
            f"- {sv.get('purpose', 'total solve')}: curvature `{sv.get('curvature')}` "
            f"({sv.get('method')}), solver `{sv.get('solver')}`, δ' = "
            f"{sv.get('solve_damping', 0.0):g}: {sv['iters']} iterations, relative residual "
            f"{sv['residual']:.2g} ({state})."
        )
    cv = summary.get("curvature") or {}
    if cv.get("horizon"):
        out.append(
            f"- estimator: the training-horizon response (t = {cv['horizon']:g}): scores predict "
            "training that long without the item minus training that long with it, as made for "
            "a λ* that is not stationary."
        )
    elif st and not st.get("converged"):
        out.append(
            "- estimator: the stationary-point influence, although λ* did not reach the "
            "stationarity tolerance: scores assume ∇F(λ*) = 0. For a λ* you will not train "
            "further, `mf.fit_curvature(..., horizon=t)` gives the training-horizon response "
            "instead (guide §4)."
        )
    else:
        out.append("- estimator: the stationary-point influence (λ* is stationary to tolerance).")
    if cv.get("method") == "secant":
        fit = cv.get("fit") or {}
        out.append(
            f"- curvature: the exact total Hessian from the {fit.get('pairs', '?')} secant pairs "
            "the stationarity phase collected (free: no pass over the tasks to fit it), rank "
            f"{fit.get('rank', '?')} plus a constant tail; used by every solve of the job "
            "(scores and edit)."
        )
    dg = summary["diagnostics"]
    src = dg.get("spectrum_from", "dense fit" if dg.get("condition_exact") else "lanczos")
    bound = {
        "dense fit": "",
        "fit Ritz values": " (Ritz values of the curvature fit: bounds, not exact)",
    }.get(src, " (Lanczos estimates)")
    out.append(
        f"- spectrum of H + δ'I{bound}: λ_min ≈ {dg.get('lambda_min', float('nan')):.3g}, "
        f"λ_max ≈ {dg.get('lambda_max', float('nan')):.3g}; regime `{dg.get('regime', 'n/a')}`."
    )
    return out


def _markdown(
    summary: dict, pngs: list[str], csvs: list[str], gallery: list[str] | None = None
) -> str:
    c = summary["config"]
    d = summary["detection"]
    ev = summary["evaluation"]
    ch = summary["target_change"]
    lines = [
        "# metafluence run report",
        "",
        f"**Dataset** {summary['dataset']}",
        "",
        f"{c['ways']}-way {c['shots']}-shot tasks, {c['queries']} queries per class; "
        f"{d['n_tasks']} meta-training tasks of which {d['n_flipped']} "
        f"({100 * c['noise']:.0f}%) have their {c.get('flip', 'support')} labels permuted "
        "(injected harm). Model: "
        f"{c['model']} (width {c['width']}, {summary['parameters']:,} meta-parameters); inner map "
        f"`{c['inner']}`; curvature `{summary['curvature'].get('curvature', c['curvature'])}` "
        f"({summary['curvature'].get('method', c['curvature_method'])}), solver "
        f"`{summary['curvature'].get('solver', c['solver'])}`, damping {c['damping']:g}, seed "
        f"{c['seed']}.",
        "",
        "Sign convention: removal effect > 0 means removing the item would raise the target loss "
        "(the item helps); < 0 means the item is harmful. Target: mean post-adaptation query "
        f"loss of {c['target_tasks']} held-out tasks (val classes).",
        "",
        "## Detection of the injected label noise",
        "",
        "| items | ROC AUC |",
        "|---|---|",
        f"| tasks | **{d['task_auc']:.3f}** |",
        f"| support points (in a flipped task) | {d['support_point_auc']:.3f} |",
        f"| query points (in a flipped task) | {d['query_point_auc']:.3f} |",
        f"| tasks, ranked by their own query loss (baseline) | "
        f"{d.get('task_auc_loss_baseline', float('nan')):.3f} |",
        f"| tasks, TracIn at λ* (gradient alignment, baseline) | "
        f"{d.get('task_auc_tracin', float('nan')):.3f} |",
        "",
        *_auc_lines(d),
        "",
        f"Recall at k = {d['k']} (the number removed): **{d['recall_at_k']:.3f}**; at 2k: "
        f"{d['recall_at_2k']:.3f}. Tasks with negative removal effect: {d['harmful_predicted']}.",
        "",
        "## Editing without retraining, checked by retraining",
        "",
        f"The {d['k']} most harmful tasks ({summary['removed_flipped']} of them label-flipped) "
        "were removed by `mf.edit` (λ* + Δλ, no retraining) and, to check, by meta-training "
        f"without them for {c['retrain_steps']} steps warm-started at λ*. 'continued' trains "
        "the same number of steps on all tasks (a control for the extra steps).",
        "",
        "| model | target loss | target acc | test loss | test acc |",
        "|---|---|---|---|---|",
    ]
    for k, v in ev.items():
        lines.append(
            f"| {k} | {v['target']['loss']:.4f} | {v['target']['accuracy']:.3f} | "
            f"{v['test']['loss']:.4f} | {v['test']['accuracy']:.3f} |"
        )
    lines += [
        "",
        "Change of the target loss relative to the original λ*: "
        + ", ".join(f"{k} {v:+.4f}" for k, v in ch.items())
        + " (predicted = first-order sum of the removed tasks' removal effects).",
        "",
        _edit_vs_control(ch),
        "",
        "## Reliability",
        "",
        *_reliability(summary),
        "",
    ]
    for wmsg in summary["warnings"]:
        lines.append(f"- warning: {wmsg}")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
    for k, v in summary["stage_seconds"].items():
        lines.append(f"| {k} | {v:.1f} |")
    if gallery:
        lines += [
            "",
            "## The most harmful and the most helpful tasks",
            "",
            f"Top rows: the {GALLERY_TASKS} tasks whose removal would lower the target loss most "
            "(most harmful); bottom rows: the ones whose removal would raise it most (most "
            "helpful). Each shows its support images (S) and its first query images (Q), "
            "captioned 'given label → label predicted after adapting to the task' (red where "
            "they differ); in a harmful task the most harmful support point is framed red.",
            "",
            *(f"![{p}]({p})" for p in gallery),
        ]
    lines += ["", "## Plots", ""]
    for p in pngs:
        lines.append(f"![{p}]({p})")
    lines += ["", "Scores: " + ", ".join(f"[{f}]({f})" for f in csvs) + ", summary.json.", ""]
    if summary.get("dataset_source"):
        lines += [f"Data: {summary['dataset_source']}.", ""]
    return "\n".join(lines)


def _html(md: str, folder: Path | None = None) -> str:
    """A minimal Markdown → HTML conversion for the report's own constructs; images found in
    ``folder`` are embedded (``data:`` URIs), so the page is one self-contained file."""
    import base64
    import re

    body, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [x.strip() for x in line.strip("|").split("|")]
            if all(set(x) <= {"-"} for x in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                tag = "th"
            else:
                tag = "td"
            body.append("<tr>" + "".join(f"<{tag}>{_inline(x)}</{tag}>" for x in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m:
            src = html.escape(m.group(2))
            img = folder / m.group(2) if folder is not None else None
            if img is not None and img.suffix == ".png" and img.is_file():
                src = "data:image/png;base64," + base64.b64encode(img.read_bytes()).decode()
            body.append(f'<p><img src="{src}" alt="{html.escape(m.group(1))}"></p>')
        elif line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<p>• {_inline(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>metafluence run report"
        f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline(s: str) -> str:
    import re

    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
    s = re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', s)
    return s


def write_report(
    out: Path,
    summary: dict[str, Any],
    task_scores: Tensor,
    task_mask: Tensor,
    support_scores: Tensor,
    query_scores: Tensor,
    task_ids: list,
    task_classes: list,
    problem: Any = None,
    meta_params: Any = None,
    tasks: list | None = None,
) -> None:
    """The report files in ``out``; with ``problem``, ``meta_params`` (λ*) and ``tasks`` also the
    gallery of the most harmful and most helpful tasks (:func:`_gallery`)."""
    pngs = _plots(out, summary, task_scores, task_mask, support_scores)
    csvs = _csvs(out, task_ids, task_classes, task_scores, task_mask, support_scores, query_scores)
    gallery = _gallery(out, problem, meta_params, tasks, task_scores, support_scores, task_mask)
    md = _markdown(summary, pngs, csvs, gallery)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(md, out))
