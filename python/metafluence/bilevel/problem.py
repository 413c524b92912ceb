"""The bilevel problem: a model, a per-sample loss, an inner map and the damping ``δ``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import FunctionalModel
from .implicit import ImplicitEngine
from .inner import Implicit, Unrolled
from .losses import PerSampleLoss, resolve_loss
from .params import ParamSpec
from .point import BilevelPoint
from .tasks import Task, TaskBatch
from .unrolled import UnrolledEngine

TasksLike = Sequence[Task] | TaskBatch
ParamsLike = Mapping[str, Tensor] | Tensor


class MetaProblem:
    """``F(λ) = Σ_i c_i L_O(θ_i(λ); Q_i) + (δ/2)‖λ‖²`` for ``model`` (math.md §1).

    Args:
        model: an ``nn.Module`` evaluated functionally (``torch.func.functional_call``) with
            the parameters it is given; its own parameters are only a template.
        loss: ``"cross_entropy"``, ``"mse"`` or ``callable(logits, y) -> [N]`` per-sample losses.
        inner: :class:`~metafluence.inner.Unrolled`, :class:`~metafluence.inner.Implicit` or
            :func:`~metafluence.inner.HeadOnly`.
        damping: ``δ ≥ 0``.
        chunk_size: tasks per batched engine call (bounds memory; None = all at once).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | PerSampleLoss = "cross_entropy",
        inner: Unrolled | Implicit | None = None,
        damping: float = 0.0,
        chunk_size: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        inner = Unrolled() if inner is None else inner
        if not isinstance(inner, (Unrolled, Implicit)):
            raise TypeError(
                f"inner must be mf.inner.Unrolled, Implicit or HeadOnly, got {type(inner).__name__}"
            )
        if not float(damping) >= 0:
            raise ValueError(f"damping={damping}: expected δ >= 0")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size={chunk_size}: expected a positive integer or None")
        self.model = model
        self.inner = inner
        self.damping = float(damping)
        self.chunk_size = chunk_size
        self.loss_fn, self.loss_name = resolve_loss(loss)
        self.spec = ParamSpec.from_module(model, inner.adapt)
        self.fm = FunctionalModel(model, self.spec, self.loss_fn)

    # ---- parameters -------------------------------------------------------------------------
    def flat(self, meta_params: ParamsLike) -> Tensor:
        """``dict → λ [P]`` (validated: names, shapes, finiteness)."""
        if isinstance(meta_params, Tensor):
            if meta_params.dim() != 1 or meta_params.shape[0] != self.spec.size:
                raise ValueError(
                    f"meta_params vector has shape {tuple(meta_params.shape)}, "
                    f"expected ({self.spec.size},)"
                )
            lam = meta_params
        else:
            for n in self.spec.names:
                if n in meta_params and not bool(torch.isfinite(meta_params[n]).all()):
                    raise ValueError(f"meta_params[{n!r}] contains NaN or Inf")
            lam = self.spec.flatten(meta_params)
        if not bool(torch.isfinite(lam).all()):
            raise ValueError("meta_params contains NaN or Inf")
        return lam.detach()

    def unflat(self, lam: Tensor) -> dict[str, Tensor]:
        """``λ [P] → dict`` (fresh tensors, model parameter order)."""
        views = self.spec.unflatten(lam.detach())
        return {n: views[n].clone() for n, _ in self.model.named_parameters() if n in views}

    def init_params(self) -> dict[str, Tensor]:
        """The model's current parameters as meta-parameters (detached copies)."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    # ---- tasks ------------------------------------------------------------------------------
    def batch(self, tasks: TasksLike, like: Tensor, task_weight: Tensor | None = None) -> TaskBatch:
        """Validate and stack ``tasks`` in ``like``'s dtype and device."""
        if isinstance(tasks, Task):
            tasks = [tasks]
        b = TaskBatch.from_tasks(
            tasks, task_weight=task_weight, dtype=like.dtype, device=like.device
        )
        if self.loss_name == "cross_entropy":
            self._check_labels(b, like)
        return b

    def _check_labels(self, b: TaskBatch, lam: Tensor) -> None:
        with torch.no_grad():
            n_out = self.fm.logits(lam, b.xs[0, :1]).shape[-1]
        for field, y in (("support y", b.ys), ("query y", b.yq)):
            if y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"{field} has dtype {y.dtype}; cross_entropy needs integer labels")
            bad = (y < 0) | (y >= n_out)
            if bool(bad.any()):
                k = int(torch.nonzero(bad.reshape(b.num_tasks, -1).any(-1)).flatten()[0])
                lab = int(y[k][bad[k]].flatten()[0])
                raise ValueError(
                    f"task {b.ids[k]!r}: {field} has label {lab} outside [0, {n_out}) "
                    f"(the model has {n_out} outputs)"
                )

    # ---- engines ----------------------------------------------------------------------------
    def _engine(self, batch: TaskBatch, lam: Tensor) -> Any:
        if isinstance(self.inner, Implicit):
            return ImplicitEngine(self.fm, self.inner, batch, lam)
        return UnrolledEngine(self.fm, self.inner, batch, lam)

    def point(
        self, meta_params: ParamsLike, tasks: TasksLike, task_weight: Tensor | None = None
    ) -> BilevelPoint:
        """Everything about ``F`` at ``λ`` over ``tasks`` (adapted params cached)."""
        lam = self.flat(meta_params)
        return BilevelPoint(self, lam, self.batch(tasks, lam, task_weight), self.chunk_size)

    # ---- convenience (the public API of api.md) ---------------------------------------------
    def adapt(self, meta_params: ParamsLike, task: Task | TasksLike) -> dict[str, Tensor] | list:
        """``θ_i(λ)`` as a parameter dict (a list of dicts for several tasks)."""
        single = isinstance(task, Task)
        tasks: TasksLike = [task] if isinstance(task, Task) else task
        pt = self.point(meta_params, tasks)
        thetas = [self.unflat(t) for t in pt.adapted()]
        return thetas[0] if single else thetas

    def outer_loss(self, meta_params: ParamsLike, tasks: TasksLike) -> Tensor:
        """``F(λ)`` without the damping term: ``Σ_i c_i L_O^i``, ``c_i = 1/M`` by default."""
        pt = self.point(meta_params, tasks)
        return (pt.batch.task_weight * pt.task_losses()).sum()

    def meta_grad(self, meta_params: ParamsLike, tasks: TasksLike) -> Tensor:
        """``∇F(λ) [P]`` (flat layout, damping included)."""
        return self.point(meta_params, tasks).meta_grad()

    def __repr__(self) -> str:
        return (
            f"MetaProblem(model={type(self.model).__name__}, loss={self.loss_name!r}, "
            f"inner={self.inner!r}, damping={self.damping}, P={self.spec.size})"
        )
