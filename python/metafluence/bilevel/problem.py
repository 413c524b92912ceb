"""The bilevel problem: a model, a per-sample loss, an inner map and the damping ``δ``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .functional import FunctionalModel
from .implicit import ImplicitEngine
from .inner import Implicit, Unrolled
from .losses import PerSampleLoss, resolve_loss
from .params import ParamSpec
from .point import BilevelPoint
from .source import TaskSource
from .tasks import Task, TaskBatch, tasks_device
from .unrolled import UnrolledEngine

TasksLike = Sequence[Task] | TaskBatch | TaskSource | Iterable[Task]
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
            first: tuple[str, torch.device] | None = None
            for n in self.spec.names:
                if n not in meta_params:
                    continue
                v = meta_params[n]
                if not isinstance(v, Tensor):
                    raise TypeError(f"meta_params[{n!r}] is {type(v).__name__}, expected a tensor")
                if not v.is_floating_point():
                    raise TypeError(
                        f"meta_params[{n!r}] has dtype {v.dtype}, expected a floating dtype"
                    )
                if first is None:
                    first = (n, v.device)
                elif v.device != first[1]:
                    raise ValueError(
                        f"meta_params[{n!r}] is on {v.device} but meta_params[{first[0]!r}] is "
                        f"on {first[1]}"
                    )
                if v.device.type != "meta" and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"meta_params[{n!r}] contains NaN or Inf")
            lam = self.spec.flatten(meta_params)
        if not lam.is_floating_point():
            raise TypeError(f"meta_params has dtype {lam.dtype}, expected a floating dtype")
        if lam.device.type != "meta" and not bool(torch.isfinite(lam).all()):
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
    def batch(
        self, tasks: TasksLike, like: Tensor, task_weight: Tensor | None = None
    ) -> TaskBatch | TaskSource:
        """Validated tasks in ``like``'s dtype and device.

        A list/tuple of :class:`Task` or a :class:`TaskBatch` is stacked into a
        :class:`TaskBatch`; a :class:`TaskSource`, a dataset (``len`` + ``__getitem__``) or a
        re-iterable iterable of tasks stays a :class:`TaskSource`, read chunk by chunk
        (``chunk_size`` tasks at a time) by every computation.
        """
        if isinstance(tasks, Task):
            tasks = [tasks]
        if isinstance(tasks, TaskSource):
            return tasks.with_task_weight(task_weight)
        if not isinstance(tasks, (list, tuple, TaskBatch)):
            return TaskSource(tasks, task_weight=task_weight)
        b = TaskBatch.from_tasks(
            tasks, task_weight=task_weight, dtype=like.dtype, device=like.device
        )
        return self.checked(b, like)

    def checked(self, b: TaskBatch, like: Tensor) -> TaskBatch:
        """``b`` after the loss-specific checks (labels in range for cross-entropy)."""
        if self.loss_name == "cross_entropy":
            self._check_labels(b, like)
        return b

    def _check_labels(self, b: TaskBatch, lam: Tensor) -> None:
        with torch.no_grad():
            n_out = self.fm.logits(lam, b.xs[0, :1]).shape[-1]
        for field, y in (("support y", b.ys), ("query y", b.yq)):
            if y.dim() != 2:
                raise ValueError(
                    f"task {b.ids[0]!r}: {field} has shape {tuple(y.shape[1:])}, expected [n] "
                    "class indices"
                )
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
        """Everything about ``F`` at ``λ`` over ``tasks`` (cached engines unless streamed)."""
        self.check_device(meta_params, tasks)
        lam = self.flat(meta_params)
        return BilevelPoint(self, lam, self.batch(tasks, lam, task_weight), self.chunk_size)

    def check_device(self, meta_params: ParamsLike, tasks: Any) -> None:
        """Meta-parameters and tasks must share one device (ValueError naming both)."""
        dev = tasks_device(tasks)
        if dev is None:
            return
        items = (
            [("meta_params", meta_params)]
            if isinstance(meta_params, Tensor)
            else [(f"meta_params[{n!r}]", v) for n, v in meta_params.items()]
        )
        for name, v in items:
            if isinstance(v, Tensor) and v.device != dev:
                raise ValueError(
                    f"{name} is on {v.device} but the tasks are on {dev}; move one of them"
                )

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
        return self.point(meta_params, tasks).outer_loss()

    def meta_grad(self, meta_params: ParamsLike, tasks: TasksLike) -> Tensor:
        """``∇F(λ) [P]`` (flat layout, damping included)."""
        return self.point(meta_params, tasks).meta_grad()

    def __repr__(self) -> str:
        return (
            f"MetaProblem(model={type(self.model).__name__}, loss={self.loss_name!r}, "
            f"inner={self.inner!r}, damping={self.damping}, P={self.spec.size})"
        )
