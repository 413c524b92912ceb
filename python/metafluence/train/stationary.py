"""The stationarity phase: a ``λ*`` that influence can stand on.

Every formula of math.md assumes ``∇F(λ*) = 0``. First-order meta-training (Adam on
mini-batches, a fixed number of steps) stops wherever its budget ends; on the glyph job
``‖∇F‖`` was 1.3 there. :func:`make_stationary` continues from that point on the *fixed* task
set with full-batch L-BFGS (two-loop recursion over ``history_size`` pairs, backtracking Armijo
line search; a pair is kept only when ``sᵀy > 0``) until

    ‖∇F(λ)‖₂ ≤ tol      (or ``max_evals`` evaluations of ``(F, ∇F)``),

and returns the accepted iterate with the smallest ``‖∇F‖`` (F falls monotonically, the
gradient norm need not), with what it did (:class:`StationarityReport`). Every retraining used
as ground truth (leave-out, warm, full) should stop by the same rule (``meta_train(...,
stationary_tol=tol)``), so that an edit and a retrain are compared at the same tolerance.

**When no stationary point exists.** A parameter block ``w_b`` (one module's parameters) that a
normalisation follows is *scale-invariant*: ``L(αw_b) = L(w_b)`` for ``α > 0``, so
``⟨w_b, ∇_b L⟩ = 0`` and the damping alone sets the radial part of the gradient,
``⟨w_b, ∇_b F⟩ / ‖w_b‖ = δ‖w_b‖``. Hence, for every ``λ``,

    ‖∇F(λ)‖₂ ≥ δ · (Σ_b ‖w_b‖²)^{1/2}  =: the radial floor,

and ``∇F = 0`` only as ``w_b → 0`` (into the normalisation's ``eps``): the damping shrinks those
weights for ever without changing what the model computes. :func:`radial_floor` finds such
blocks (the radial identity on ``∇F``, guarded by the adapted outputs under doubling the block,
on a few tasks); the report carries the floor and a warning says when the tolerance is below it
(or was met only by shrinking them).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from .._checks import check_float, check_int
from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..data.source import TaskSource
from ..data.tasks import TaskBatch
from ._bar import progress_bar


@dataclass
class StationarityReport:
    """What the stationarity phase did: ``‖∇F‖`` and ``F`` before and after, the number of
    ``(F, ∇F)`` evaluations (each one full meta-gradient over the tasks), the wall time, and
    whether ``‖∇F‖ ≤ tol`` was reached. ``radial_floor`` is the bound
    ``‖∇F‖ ≥ δ(Σ_b ‖w_b‖²)^{1/2}`` at the returned λ and ``scale_invariant`` the blocks ``b``
    that set it (module docstring; 0 and ``()`` when there are none). ``pairs`` holds the
    secant pairs ``(S [r, P], Y [r, P])`` the phase accepted (the newest ``keep_pairs``;
    ``y_j = ∇F(λ_{j+1}) − ∇F(λ_j)``), a curvature for free
    (``mf.fit_curvature(method="secant", pairs=...)``); it is left out of :meth:`as_dict`."""

    tol: float
    grad_norm_before: float
    grad_norm_after: float
    objective_before: float
    objective_after: float
    evaluations: int
    seconds: float
    converged: bool
    method: str = "lbfgs"
    radial_floor: float = 0.0  # ‖∇F‖ ≥ this at every λ with these norms (module docstring)
    scale_invariant: tuple[str, ...] = ()  # the blocks that set it (module names)
    secant_pairs: int = 0  # how many pairs ``pairs`` holds
    pairs: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pairs"}

    def line(self) -> str:
        """One line for reports."""
        state = "reached" if self.converged else "NOT reached"
        out = (
            f"stationarity ({self.method}): ‖∇F‖ {self.grad_norm_before:.3g} → "
            f"{self.grad_norm_after:.3g} (tol {self.tol:.3g} {state}), F "
            f"{self.objective_before:.4g} → {self.objective_after:.4g}, "
            f"{self.evaluations} gradient evaluations, {self.seconds:.1f} s"
        )
        if self.scale_invariant:
            out += f"; {floor_note(self.radial_floor, self.scale_invariant)}"
        return out


def floor_note(floor: float, blocks: tuple[str, ...] | list[str]) -> str:
    """One sentence on the radial floor, for reports and warnings."""
    return (
        f"‖∇F‖ ≥ {floor:.3g} at any λ with these weight norms: {len(blocks)} damped "
        f"scale-invariant block(s) ({', '.join(blocks)}: a normalisation follows them, or the "
        "outputs no longer depend on them) have no stationary point short of w → 0"
    )


def radial_floor(
    problem: MetaProblem,
    lam: Tensor,
    batch: TaskBatch | TaskSource,
    grad: Tensor,
    tasks: int = 8,
    rtol: float = 0.1,
) -> tuple[float, tuple[str, ...]]:
    """``(δ (Σ_b ‖w_b‖²)^{1/2}, names)`` over the scale-invariant blocks ``b`` (module docstring).

    Candidates are the modules with a parameter of two or more dimensions (conv filters, linear
    weights). A block counts as scale-invariant when the damping makes up the radial part of
    ``grad = ∇F(λ) [P]`` to 1%, ``|⟨w_b, ∇_b F⟩ / ‖w_b‖² − δ| ≤ δ/100`` (Euler's
    ``⟨w_b, ∇_b L⟩ = 0``: this decides), and — a guard against a block that is not invariant
    but whose radial part equals ``δ‖w_b‖`` by a coincidence (of order 1e-3) — when scaling it
    by 2 moves the adapted models' query outputs on the first ``tasks`` tasks by at most
    ``rtol`` relatively, ``‖z(2w_b) − z(w_b)‖ ≤ rtol ‖z(w_b)‖``. The normalisation's ``eps``
    leaves a trace there (measured on the job's model: ≤ 3e-4 at its λ*, 2–8% at a λ that
    memorises its tasks, F ≈ 0.04, where doubling the head moves them by 20%); a block that no
    normalisation follows moves them by its share of the logits (doubling a layer of a ReLU chain
    doubles them). The outputs, not the loss: a small, memorised loss magnifies that trace
    (21% for a conv block against 1% for the head there). One adaptation of those tasks per
    candidate that passes the first test; ``(0.0, ())`` when ``δ = 0`` or there are no tasks.
    """
    if problem.damping == 0 or batch.num_tasks == 0:
        return 0.0, ()
    few = min(int(tasks), batch.num_tasks)
    if isinstance(batch, TaskBatch):
        sub = batch.slice(0, few)
    else:  # a streamed source: its first chunk of `few` tasks
        sub = next(iter(batch.chunks(few, dtype=lam.dtype, device=lam.device)))
    x = lam.detach()
    groups, ndims = module_blocks(problem)

    def outputs(v: Tensor) -> Tensor:  # the adapted models' query outputs [k, m, out]
        with torch.no_grad():
            return vmap(problem.fm.logits)(problem.point(v, sub).adapted(), sub.xq)

    base: Tensor | None = None  # the sub-batch's outputs, computed once a candidate needs them
    found, sq = [], 0.0
    for mod, parts in groups.items():
        if ndims[mod] < 2:
            continue
        w_sq = _sq_norm(x, parts)
        if w_sq == 0:
            continue
        radial = sum(float(x[sl] @ grad[sl]) for sl in parts) / w_sq
        if abs(radial - problem.damping) > 0.01 * problem.damping:
            continue
        y = x.clone()
        for sl in parts:
            y[sl] *= 2.0
        if base is None:
            base = outputs(x)
        if float((outputs(y) - base).norm()) <= rtol * float(base.norm()):
            found.append(mod)
            sq += w_sq
    return problem.damping * sq**0.5, tuple(found)


def module_blocks(problem: MetaProblem) -> tuple[dict[str, list[slice]], dict[str, int]]:
    """``({module: its slices of λ}, {module: largest parameter rank})`` in flat layout: the
    parameter blocks :func:`radial_floor` scales (a module's name is its parameters' prefix)."""
    groups: dict[str, list[slice]] = {}
    ndims: dict[str, int] = {}
    k = 0
    for name, shape in zip(problem.spec.names, problem.spec.shapes, strict=True):
        n = int(torch.Size(shape).numel())
        mod = name.rsplit(".", 1)[0] if "." in name else name
        groups.setdefault(mod, []).append(slice(k, k + n))
        ndims[mod] = max(ndims.get(mod, 0), len(shape))
        k += n
    return groups, ndims


def _sq_norm(x: Tensor, parts: list[slice]) -> float:
    return sum(float(x[sl].square().sum()) for sl in parts)


def make_stationary(
    problem: MetaProblem,
    meta_params: ParamsLike,
    tasks: TasksLike,
    tol: float,
    max_evals: int = 200,
    history_size: int = 20,
    task_weight: Tensor | None = None,
    progress: bool = False,
    keep_pairs: int = 64,
    return_best: bool = True,
) -> tuple[dict[str, Tensor], StationarityReport]:
    """Full-batch L-BFGS from ``meta_params`` until ``‖∇F‖₂ ≤ tol`` (module docstring).

    Args:
        tol: ``> 0``, the gradient-norm tolerance (2-norm, damping term included).
        max_evals: at most this many ``(F, ∇F)`` evaluations (line-search trials and the
            first evaluation included).
        history_size: L-BFGS memory.
        keep_pairs: how many of the newest accepted secant pairs the report keeps (the
            ``"secant"`` curvature's raw material; 0: none).
        return_best: return the accepted iterate with the smallest ``‖∇F‖`` (default: the
            most stationary point, what influence stands on), or with ``False`` the last one
            (the smallest ``F``: what a retrain used as ground truth should return — from a
            warm start the most stationary iterate can be the start itself when the tolerance
            is not reached).

    Returns ``(meta_params, report)``. Deterministic on CPU for a fixed thread count.
    """
    tol = check_float(tol, "stationary_tol", positive=True)
    max_evals = check_int(max_evals, "stationary_evals", minimum=1)
    history_size = check_int(history_size, "history_size", minimum=1)
    keep_pairs = check_int(keep_pairs, "keep_pairs", minimum=0)
    t0 = time.perf_counter()
    lam = problem.flat(meta_params).detach().clone()
    batch = problem.batch(tasks, lam, task_weight)
    evals = 0

    def value_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal evals
        evals += 1
        f_x, g_x = problem.point(x, batch).value_and_grad()
        return f_x.detach(), g_x.detach()

    x, (f_t, g) = lam, value_and_grad(lam)
    f, gn = float(f_t), float(g.norm())
    f_before, gn_before = f, gn
    best = (x, f, gn, g)  # the most stationary accepted iterate (‖∇F‖ need not fall monotonically)
    S: list[Tensor] = []
    Y: list[Tensor] = []
    kept: list[tuple[Tensor, Tensor]] = []  # the newest keep_pairs accepted pairs
    bar = progress_bar(max_evals, progress, "stationarity (L-BFGS)")
    while gn > tol and evals < max_evals:
        d = -_two_loop(g, S, Y)
        slope = float(g @ d)
        if not slope < 0:  # not a descent direction: forget the memory
            S.clear(), Y.clear()
            d, slope = -g / max(gn, 1.0), -(gn**2) / max(gn, 1.0)
        t, before, accepted = 1.0, evals, False
        while evals < max_evals:  # backtracking (Armijo, c1 = 1e-4)
            f_new_t, g_new = value_and_grad(x + t * d)
            f_new = float(f_new_t)
            if f_new <= f + 1e-4 * t * slope:
                accepted = True
                break
            t *= 0.5
        if bar is not None:
            bar.update(evals - before)
        if not accepted:
            break
        s_k, y_k = t * d, g_new - g
        if float(s_k @ y_k) > 1e-10 * float(s_k.norm() * y_k.norm()):
            S.append(s_k), Y.append(y_k)
            if len(S) > history_size:
                S.pop(0), Y.pop(0)
            if keep_pairs:
                kept.append((s_k, y_k))
                del kept[:-keep_pairs]
        x, f, g = x + s_k, f_new, g_new
        gn = float(g.norm())
        if gn < best[2]:
            best = (x, f, gn, g)
        if bar is not None:
            bar.set_postfix(grad=gn, F=f)
    if bar is not None:
        bar.close()
    if return_best:
        x, f, gn, g = best
    floor, blocks = radial_floor(problem, x, batch, grad=g)
    groups = module_blocks(problem)[0] if blocks else {}
    floor_start = problem.damping * sum(_sq_norm(lam, groups[b]) for b in blocks) ** 0.5
    # warn when the floor binds: above tol at the end, or above it at the start and met only
    # because the damping shrank those weights
    if blocks and (floor >= tol or (gn <= tol and floor_start >= tol)):
        how = (
            f"was met only because the damping shrank them from a floor of {floor_start:.3g} "
            f"to {floor:.3g}: a λ* whose normalised layers are being scaled away"
            if gn <= tol
            else f"cannot be reached: {floor_note(floor, blocks)} (the damping shrinks them for "
            "ever)"
        )
        warnings.warn(
            f"stationarity: tol {tol:.3g} {how}. Scale-invariant block(s): {', '.join(blocks)}; "
            "use a model without normalisation after these layers, or read ‖∇F‖ against the "
            "floor.",
            stacklevel=2,
        )
    report = StationarityReport(
        tol=tol,
        grad_norm_before=gn_before,
        grad_norm_after=gn,
        objective_before=f_before,
        objective_after=f,
        evaluations=evals,
        seconds=time.perf_counter() - t0,
        converged=gn <= tol,
        radial_floor=floor,
        scale_invariant=blocks,
        secant_pairs=len(kept),
        pairs=(torch.stack([p[0] for p in kept]), torch.stack([p[1] for p in kept]))
        if kept
        else None,
    )
    return problem.unflat(x.detach()), report


def _two_loop(g: Tensor, S: list[Tensor], Y: list[Tensor]) -> Tensor:
    """The L-BFGS inverse-Hessian product ``H_k g`` (two-loop recursion, ``H_0 = γI`` with
    ``γ = sᵀy / yᵀy`` of the newest pair; without pairs ``g`` itself)."""
    q = g.clone()
    alphas = []
    for s_i, y_i in zip(reversed(S), reversed(Y), strict=True):
        a = float(s_i @ q) / float(y_i @ s_i)
        alphas.append(a)
        q = q - a * y_i
    if S:
        q = q * (float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]))
    for (s_i, y_i), a in zip(zip(S, Y, strict=True), reversed(alphas), strict=True):
        b = float(y_i @ q) / float(y_i @ s_i)
        q = q + (a - b) * s_i
    return q
