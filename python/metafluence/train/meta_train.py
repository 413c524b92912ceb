"""Meta-training: simple, seeded, deterministic on CPU, with a fixed stopping rule.

``meta_train`` minimises ``F(λ) = Σ_i c_i L_O(θ_i(λ); Q_i) + (δ/2)‖λ‖²`` from the model's current
parameters (the shared initialisation, so that retraining is honest) with one of

- ``"adam"`` / ``"sgd"``: ``steps`` updates on the full task set, or on seeded mini-batches of
  ``batch_size`` tasks (then ``c_i = 1/batch_size`` inside a batch);
- ``"lbfgs"``: full batch, strong-Wolfe line search (float64 recommended);
- ``"newton"``: full batch, dense exact total Hessian (small ``P`` only).

Stopping rule: after ``steps`` iterations, or as soon as ``‖∇F‖ ≤ tol`` (full batch only).
``newton_refine`` polishes a stationary point to ``‖∇F‖ ≤ 1e-12`` (ground-truth retraining).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..bilevel.problem import MetaProblem, ParamsLike, TasksLike
from ..bilevel.tasks import TaskBatch

OPTIMIZERS = ("adam", "sgd", "lbfgs", "newton")


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False)


def meta_train(
    problem: MetaProblem,
    model: torch.nn.Module | None,
    tasks: TasksLike,
    steps: int = 100,
    outer_lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
    batch_size: int | None = None,
    tol: float = 0.0,
    init: ParamsLike | None = None,
    task_weight: Tensor | None = None,
    progress: bool = False,
    callback: Callable[[int, Tensor, float], None] | None = None,
    history: list[float] | None = None,
) -> dict[str, Tensor]:
    """Train meta-parameters; returns them as a dict (model parameter order).

    Args:
        problem: the :class:`MetaProblem`.
        model: supplies the initial parameters (defaults to ``problem.model``); ``init`` overrides.
        tasks: meta-training tasks (list of Task or a TaskBatch whose weights are respected).
        steps: iterations (optimizer steps; L-BFGS: outer iterations; Newton: steps).
        outer_lr: step size (Adam/SGD) or L-BFGS ``lr``.
        seed: seeds the mini-batch order (the run is deterministic on CPU).
        optimizer: ``"adam" | "sgd" | "lbfgs" | "newton"``.
        batch_size: tasks per step for Adam/SGD (None = all).
        tol: stop when ``‖∇F‖ ≤ tol`` (full batch).
        history: if given, ``F`` after each step is appended to it.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")
    if int(steps) < 0:
        raise ValueError(f"steps={steps}: expected >= 0")
    if init is not None:
        lam0 = problem.flat(init)
    else:
        src = problem.model if model is None else model
        lam0 = problem.spec.flatten({n: p.detach() for n, p in src.named_parameters()})
    lam = lam0.clone()
    full = problem.batch(tasks, lam, task_weight)
    gen = torch.Generator().manual_seed(int(seed))
    bar = _progress(int(steps), progress, f"meta-train ({optimizer})")

    def value_and_grad(x: Tensor, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        pt = problem.point(x, batch)
        return pt.objective().detach(), pt.meta_grad().detach()

    if optimizer == "newton":
        lam = problem.flat(newton_refine(problem, lam, full, tol=tol, max_steps=int(steps)))
    elif optimizer == "lbfgs":
        x = lam.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [x],
            lr=outer_lr,
            max_iter=20,
            history_size=50,
            line_search_fn="strong_wolfe",
            tolerance_grad=max(tol, 1e-300),
            tolerance_change=0.0,
        )

        def closure() -> Tensor:
            f, g = value_and_grad(x.detach(), full)
            x.grad = g
            return f

        for it in range(int(steps)):
            opt.step(closure)
            f, g = value_and_grad(x.detach(), full)
            if history is not None:
                history.append(float(f))
            if callback is not None:
                callback(it, x.detach(), float(f))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(F=float(f), grad=float(g.norm()))
            if float(g.norm()) <= tol:
                break
        lam = x.detach()
    else:
        x = lam.clone().requires_grad_(True)
        opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        sgd_opt = opt_cls([x], lr=outer_lr)
        M = full.num_tasks
        for it in range(int(steps)):
            if batch_size is None or batch_size >= M:
                batch = full
            else:
                idx = torch.randperm(M, generator=gen)[: int(batch_size)].tolist()
                sub = full.select(idx)
                batch = sub.with_weights(
                    task_weight=torch.full_like(sub.task_weight, 1.0 / len(idx))
                )
            f, g = value_and_grad(x.detach(), batch)
            if history is not None:
                history.append(float(f))
            if batch is full and float(g.norm()) <= tol:
                break
            sgd_opt.zero_grad(set_to_none=True)
            x.grad = g
            sgd_opt.step()
            if callback is not None:
                callback(it, x.detach(), float(f))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(F=float(f))
        lam = x.detach()
    if bar is not None:
        bar.close()
    return problem.unflat(lam)


def newton_refine(
    problem: MetaProblem,
    meta_params: ParamsLike,
    tasks: TasksLike,
    tol: float = 1e-12,
    max_steps: int = 30,
    prox: tuple[float, Tensor] | None = None,
    task_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """Newton steps with the dense exact total Hessian until ``‖∇F‖ ≤ tol``.

    Minimises ``F(λ)`` (+ ``(δ'/2)‖λ − λ_0‖²`` when ``prox = (δ', λ_0)``: the proximal
    response). Each step solves ``H Δ = −∇F`` densely (small ``P``), with backtracking on
    ``‖∇F‖``. Used as the ground-truth retrainer: started at ``λ*`` it stays on the same branch
    of stationary points, unlike a first-order optimiser on a near-flat objective.
    """
    lam = problem.flat(meta_params).clone()
    batch = problem.batch(tasks, lam, task_weight)
    P = lam.shape[0]
    eye = torch.eye(P, dtype=lam.dtype, device=lam.device)

    def grad_at(x: Tensor) -> Tensor:
        g = problem.point(x, batch).meta_grad()
        if prox is not None:
            g = g + prox[0] * (x - prox[1])
        return g.detach()

    g = grad_at(lam)
    for _ in range(int(max_steps)):
        gn = float(g.norm())
        if gn <= tol:
            break
        pt = problem.point(lam, batch)
        H = pt.hvp(eye, "exact").detach()
        H = 0.5 * (H + H.T)
        if prox is not None:
            H = H + prox[0] * eye
        try:
            step = torch.linalg.solve(H, -g)
        except RuntimeError:
            step = -torch.linalg.lstsq(H, g.unsqueeze(-1)).solution.squeeze(-1)
        t = 1.0
        while True:
            cand = lam + t * step
            gc = grad_at(cand)
            if float(gc.norm()) < gn or t < 1e-6:
                break
            t *= 0.5
        lam, g = cand, gc
    return problem.unflat(lam)


def grad_norm(problem: MetaProblem, meta_params: ParamsLike, tasks: TasksLike) -> float:
    """``‖∇F(λ)‖``."""
    return float(problem.meta_grad(meta_params, tasks).norm())
