"""The bilevel problem: a model, a per-sample loss, an inner map and the damping ``δ``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import MAX_DAMPING, check_finite, check_float, check_int
from ..data.source import TaskSource
from ..data.tasks import Task, TaskBatch, tasks_device
from .engine import Engine, build_engine
from .functional import FunctionalModel
from .inner import Implicit, Unrolled
from .losses import PerSampleLoss, resolve_loss
from .params import ParamSpec
from .point import BilevelPoint
from .reduce import LocalReduce, Reduction

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
        reduce: how this process's tasks combine with other processes' (:class:`Reduction`);
            a single process by default. ``mf.distributed.ShardedProblem(problem)`` passes the
            all-reduce of ``torch.distributed``: each rank then owns a contiguous block of the
            tasks (:func:`shard_range`) and every result is the single-process one.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: str | PerSampleLoss = "cross_entropy",
        inner: Unrolled | Implicit | None = None,
        damping: float = 0.0,
        chunk_size: int | None = None,
        reduce: Reduction | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        inner = Unrolled() if inner is None else inner
        if not isinstance(inner, (Unrolled, Implicit)):
            raise TypeError(
                f"inner must be mf.inner.Unrolled, Implicit or HeadOnly, got {type(inner).__name__}"
            )
        damping = check_float(damping, "damping", minimum=0.0, maximum=MAX_DAMPING)
        if chunk_size is not None:
            chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
        reduce = LocalReduce() if reduce is None else reduce
        if not isinstance(reduce, Reduction):
            raise TypeError(
                f"reduce must be a Reduction (sum, cat, objects, max, rank, world), got "
                f"{type(reduce).__name__}"
            )
        self.model = model
        self.inner = inner
        self.reduce: Reduction = reduce
        self._loss = loss
        self.damping = damping
        self.chunk_size = chunk_size
        # input shapes/dtypes that passed the one-task dry run (see :meth:`checked`)
        self._fitting: dict[tuple[Any, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.loss_fn, self.loss_name = resolve_loss(loss)
        self.spec = ParamSpec.from_module(model, inner.adapt)
        self.fm = FunctionalModel(model, self.spec, self.loss_fn)

    # ---- parameters -------------------------------------------------------------------------
    def flat(self, meta_params: ParamsLike) -> Tensor:
        """``dict → λ [P]``, validated: a dict with exactly the model's (meta-learned)
        parameter names and shapes, or a flat floating tensor of size ``P``; finite in the dtype
        ``λ`` has (the dtype the model computes in)."""
        P = self.spec.size
        if isinstance(meta_params, Tensor):
            if meta_params.dim() != 1 or meta_params.shape[0] != P:
                raise ValueError(
                    f"meta_params vector has shape {tuple(meta_params.shape)}, expected ({P},)"
                )
            lam = meta_params
        elif isinstance(meta_params, Mapping):
            self._check_param_dict(meta_params)
            lam = self.spec.flatten(meta_params)
        else:
            raise TypeError(
                "meta_params must be a dict name → tensor with the model's parameters "
                f"({', '.join(self.spec.names)}) or a flat tensor of size P={P}, got "
                f"{type(meta_params).__name__}"
            )
        if not lam.is_floating_point():
            raise TypeError(f"meta_params has dtype {lam.dtype}, expected a floating dtype")
        if lam.device.type != "meta" and not bool(torch.isfinite(lam).all()):
            if isinstance(meta_params, Mapping):  # name the entry (mixed dtypes: after the cat)
                for n, v in self.spec.unflatten(lam).items():
                    check_finite(v, f"meta_params[{n!r}]")
            raise ValueError("meta_params contains NaN or Inf")
        return lam.detach()

    def _check_param_dict(self, meta_params: Mapping[Any, Any]) -> None:
        """Names (exactly the spec's: KeyError for a missing one, ValueError for an extra one),
        tensor types, floating dtypes, one device and finiteness of each entry."""
        extra = [k for k in meta_params if k not in self.spec.names]
        if extra:
            raise ValueError(
                f"meta_params has entries {extra} that are not meta-learned parameters of the "
                f"model; expected exactly {list(self.spec.names)}"
            )
        first: tuple[str, torch.device] | None = None
        for n in self.spec.names:
            if n not in meta_params:
                continue  # spec.flatten raises the KeyError naming every missing one
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
            if v.device.type != "meta":
                check_finite(v, f"meta_params[{n!r}]")

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
        if tasks is None or isinstance(tasks, (str, bytes, Tensor, Mapping)):
            raise TypeError(
                f"tasks must be a list of mf.Task, a TaskBatch or a TaskSource, got "
                f"{type(tasks).__name__}"
            )
        if not isinstance(tasks, (list, tuple, TaskBatch)):
            return TaskSource(tasks, task_weight=task_weight)
        b = TaskBatch.from_tasks(
            tasks, task_weight=task_weight, dtype=like.dtype, device=like.device
        )
        return self.checked(b, like)

    def checked(self, b: TaskBatch, like: Tensor) -> TaskBatch:
        """``b`` after the checks against the model: a one-task dry run (:meth:`_dry_run`) and
        the loss-specific ones (labels in range for cross-entropy)."""
        self._dry_run(b, like)
        if self.loss_name == "cross_entropy":
            self._check_labels(b, like)
        return b

    def _dry_run(self, b: TaskBatch, lam: Tensor) -> None:
        """Forward one support set and one query set (the first task's) through the model and
        the loss at ``lam``: features that do not fit the model, or labels whose shape does not
        fit its output, raise a ValueError naming the task, the set and the expected shape
        (instead of a shape error from deep inside torch, or a silent broadcast). Cached per
        input shapes and dtypes: each new shape costs one forward."""
        if lam.device.type == "meta" or b.num_tasks == 0:
            return
        key = (
            *(tuple(t.shape[2:]) for t in (b.xs, b.ys, b.xq, b.yq)),
            *(t.dtype for t in (b.xs, b.ys, b.xq, b.yq)),
            lam.dtype,
            lam.device,
        )
        if key in self._fitting:
            return
        out_shapes = []
        for field, x, y in (("support", b.xs[0], b.ys[0]), ("query", b.xq[0], b.yq[0])):
            out_shapes.append(self._dry_run_set(b.ids[0], field, x, y, lam))
        self._fitting[key] = (tuple(b.xs.shape[2:]), out_shapes[0])

    def _dry_run_set(self, tid: Any, field: str, x: Tensor, y: Tensor, lam: Tensor) -> tuple:
        """The model's output shape (per point) on one set; ValueError if ``x``/``y`` do not fit."""
        try:
            with torch.no_grad():
                out = self.fm.logits(lam, x)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise ValueError(
                f"task {tid!r}: {field} x of shape {tuple(x.shape)} (dtype {x.dtype}) does not "
                f"fit the model: expected {self._expected_input()} ({_first_line(e)})"
            ) from None
        if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"task {tid!r}: the model maps {field} x of shape {tuple(x.shape)} to {got}; "
                f"expected one output row per point ({x.shape[0]}, ...)"
            )
        if self.loss_name == "mse":
            fits = y.shape == out.shape or (out.shape[-1] == 1 and y.shape == out.shape[:-1])
            if not fits:
                raise ValueError(
                    f"task {tid!r}: {field} y has shape {tuple(y.shape)}, expected "
                    f"{tuple(out.shape)} (the model's output for {x.shape[0]} points) for "
                    "loss='mse'"
                )
        if self.loss_name in ("mse", "cross_entropy"):
            return tuple(out.shape[1:])
        try:
            with torch.no_grad():
                per = self.loss_fn(out, y)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise ValueError(
                f"task {tid!r}: loss {self.loss_name!r} fails on {field} y of shape "
                f"{tuple(y.shape)} and outputs of shape {tuple(out.shape)} ({_first_line(e)})"
            ) from None
        if not isinstance(per, Tensor) or tuple(per.shape) != (x.shape[0],):
            got = tuple(per.shape) if isinstance(per, Tensor) else type(per).__name__
            raise ValueError(
                f"task {tid!r}: loss {self.loss_name!r} returned {got} on {field} set of "
                f"{x.shape[0]} points; expected per-sample losses of shape ({x.shape[0]},)"
            )
        return tuple(out.shape[1:])

    def _expected_input(self) -> str:
        """What the model takes: the per-point shape of inputs that fitted before, else what its
        first layer wants."""
        if self._fitting:
            shape = next(iter(self._fitting.values()))[0]
            return f"[N, {', '.join(map(str, shape))}] like the tasks that fitted before"
        for m in self.model.modules():
            if isinstance(m, nn.Linear):
                return f"[N, ..., {m.in_features}] (the first layer is Linear({m.in_features}, ·))"
            if isinstance(m, nn.modules.conv._ConvNd):
                return (
                    f"[N, {m.in_channels}, ...] (the first layer is "
                    f"{type(m).__name__}({m.in_channels}, ·))"
                )
        return "inputs the model accepts"

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
                raise TypeError(
                    f"task {b.ids[0]!r}: {field} has dtype {y.dtype}; cross_entropy needs "
                    "integer labels"
                )
            bad = (y < 0) | (y >= n_out)
            if bool(bad.any()):
                k = int(torch.nonzero(bad.reshape(b.num_tasks, -1).any(-1)).flatten()[0])
                lab = int(y[k][bad[k]].flatten()[0])
                raise ValueError(
                    f"task {b.ids[k]!r}: {field} has label {lab} outside [0, {n_out}) "
                    f"(the model has {n_out} outputs)"
                )

    # ---- engines and points -------------------------------------------------------------
    def engine(self, meta_params: ParamsLike, tasks: TasksLike) -> Engine:
        """The inner map's :class:`~metafluence.bilevel.engine.Engine` for ``tasks`` (stacked
        into one chunk, validated) at ``meta_params``: the blocks of the weighted meta-objective,
        batched over the tasks (what :class:`BilevelPoint` sums over chunks)."""
        self.check_device(meta_params, tasks)
        lam = self.flat(meta_params)
        b = self.batch(tasks, lam)  # a stacked batch is checked there
        if isinstance(b, TaskSource):  # a stream is checked chunk by chunk: its one chunk here
            b = self.checked(next(b.chunks(None, lam.dtype, lam.device)), lam)
        return build_engine(self.fm, self.inner, b, lam)

    def point(
        self, meta_params: ParamsLike, tasks: TasksLike, task_weight: Tensor | None = None
    ) -> BilevelPoint:
        """Everything about ``F`` at ``λ`` over ``tasks`` (cached engines unless streamed).

        With a multi-process :attr:`reduce`, this rank's point covers tasks
        ``shard_range(M, rank, world)`` and every reduction over tasks spans all ranks."""
        self.check_device(meta_params, tasks)
        lam = self.flat(meta_params)
        full = self.batch(tasks, lam, task_weight)
        if self.reduce.world == 1:
            return BilevelPoint(self, lam, full, self.chunk_size)
        lo, hi = shard_range(full.num_tasks, self.reduce.rank, self.reduce.world)
        local = full.slice(lo, hi) if isinstance(full, TaskBatch) else full.shard(lo, hi)
        return BilevelPoint(self, lam, local, self.chunk_size, reduce=self.reduce, offset=lo)

    def with_reduce(self, reduce: Reduction) -> MetaProblem:
        """The same problem (model, loss, inner map, ``δ``, chunk size) whose points combine
        their tasks through ``reduce`` (built anew from the arguments, no state copied)."""
        return MetaProblem(
            self.model, self._loss, self.inner, self.damping, self.chunk_size, reduce=reduce
        )

    def check_device(self, meta_params: ParamsLike, tasks: Any) -> None:
        """Meta-parameters and tasks must share one device (ValueError naming both)."""
        dev = tasks_device(tasks)
        if dev is None or not isinstance(meta_params, (Tensor, Mapping)):
            return  # (flat names a meta_params of the wrong type)
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
        ranks = f", rank {self.reduce.rank} of {self.reduce.world}" if self.reduce.world > 1 else ""
        return (
            f"MetaProblem(model={type(self.model).__name__}, loss={self.loss_name!r}, "
            f"inner={self.inner!r}, damping={self.damping}, P={self.spec.size}{ranks})"
        )


def shard_range(M: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous block ``[lo, hi)`` of ``M`` tasks for ``rank`` of ``world`` (sizes differ ≤ 1)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank}, world={world}: expected 0 <= rank < world")
    base, extra = divmod(int(M), int(world))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _first_line(e: BaseException) -> str:
    """``type: message`` of an exception, first line only (torch messages run long)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"
