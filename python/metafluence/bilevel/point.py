"""The meta-objective linearised at ``λ``: total gradients and total-Hessian operators.

``F(λ) = Σ_i c_i L_O(θ_i(λ); Q_i, v_i) + (δ/2)‖λ‖²`` over a :class:`TaskBatch` processed in
chunks of tasks (each chunk one batched engine call, never a Python loop over tasks).

Curvatures of the total Hessian ``H`` (math.md §2), all ``x ↦ Hx`` operators on ``[k, P]``:

- ``"exact"``: ``Σ_i c_i D²_λ L_O^i + δI`` (second-order autodiff through the inner map);
- ``"gauss_newton"``: ``Σ_i c_i J_iᵀ G_i J_i + δI`` with ``J_i = ∂ logits(Q_i) / ∂λ`` through the
  inner map and ``G_i`` the loss Hessian in the logits (weighted ``v_q / m``); PSD;
- ``"gamma"`` (the paper's surrogate): ``Σ_i c_i Θ_λᵀ ∇²_Θ L_O^i Θ_λ + (Γ + δ) I`` with
  ``Γ = Σ_i c_i ‖∇_θ L_O^i‖₁`` (adapted block), i.e. the ``d²θ/dλ²`` terms dropped.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from .._store import digest
from ..data.source import TaskSource, _localise
from ..data.tasks import TaskBatch, item_masks
from ._budget import LinearisationBudget
from ._func import jvp, vjp
from ._tape import Blocks, ProductTape
from .engine import Engine, build_engine
from .inner import Implicit
from .losses import logit_hessian_vp
from .reduce import LocalReduce, Reduction

CURVATURES = ("exact", "gauss_newton", "gamma")


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}: expected one of {CURVATURES}")
    return curvature


def _identity(x: Any) -> Any:
    return x


def batch_digest(b: TaskBatch) -> str:
    """A digest of a batch's tensors, weights and ids (ids by ``repr``)."""
    blocks = [b.xs, b.ys, b.xq, b.yq, b.task_weight, b.support_weight, b.query_weight]
    return str(digest({"tensors": blocks, "ids": [repr(i) for i in b.ids]}))


class ChunkBuild:
    """The engine of one chunk of tasks, built when called; ``batch`` holds the chunk's tasks
    (read, not adapted: identifying a chunk costs no inner adaptation)."""

    def __init__(self, batch: TaskBatch, build: Callable[[], Any]) -> None:
        self.batch = batch
        self._build = build

    def __call__(self) -> Any:
        return self._build()


class BilevelPoint:
    """All first- and second-order quantities of the meta-objective at one ``λ``.

    ``tasks`` is a :class:`TaskBatch` (engines for its chunks are built once and cached) or a
    :class:`~metafluence.data.source.TaskSource` (streamed: each pass reads and adapts one
    chunk at a time, so memory stays bounded by ``chunk_size`` tasks; every pass pays the inner
    adaptation again). ``reduce`` combines this process's tasks with other processes' (the
    problem's :class:`~metafluence.bilevel.reduce.Reduction`; a multi-process one shards tasks).
    Per-item inputs and outputs (``dc [M]``, ``dW [M, n]``, ...) always cover *all* ``M`` tasks.
    """

    #: the share of the device's memory (CPU: physical memory) that the engines of an in-memory
    #: point may keep as linearisations (:meth:`Engine.linearised`: the gradient's graph,
    #: ≈ 15 MB per task on the Conv-4 job) for all second-order products at this point; chunks
    #: past it, and a streamed point's, build their own graph per product (0: never keep)
    LINEARISE_FRACTION = 0.25

    def __init__(
        self,
        problem: Any,
        lam: Tensor,
        tasks: TaskBatch | TaskSource,
        chunk_size: int | None,
        reduce: Reduction | None = None,
        offset: int = 0,
    ):
        self.problem, self.lam = problem, lam
        self.reduce: Reduction = LocalReduce() if reduce is None else reduce
        self.damping = float(problem.damping)
        self.chunk_size = chunk_size
        self.num_local = tasks.num_tasks
        self.offset = tasks.offset if isinstance(tasks, TaskSource) else int(offset)
        if isinstance(tasks, TaskBatch):
            self._batch: TaskBatch | None = tasks
            self.source: TaskSource | None = None
            self._engines: list[Engine] | None = [
                build_engine(problem.fm, problem.inner, b, lam) for b in tasks.chunks(chunk_size)
            ]
            budget = LinearisationBudget.share(lam.device, self.LINEARISE_FRACTION)
            for e in self._engines:  # one linearisation per engine for all products here,
                if hasattr(e, "linearisation_budget"):  # within one memory budget
                    e.linearisation_budget = budget
        else:
            self._batch, self.source, self._engines = None, tasks, None
        self._gamma: float | None = None
        self._tape: ProductTape | None = None
        self._ids: list[Any] | None = None
        self._fingerprint: dict[str, Any] | None = None

    # ---- tasks ---------------------------------------------------------------------------
    @property
    def batch(self) -> TaskBatch:
        """The stacked tasks (in-memory points only; a streamed point never stacks them)."""
        if self._batch is None:
            raise TypeError(
                "this point streams its tasks from a TaskSource and never stacks them; use "
                "pt.ids, pt.weights() and pt.item_scores() instead of pt.batch"
            )
        return self._batch

    @property
    def engines(self) -> list[Engine] | Iterator[Engine]:
        """One engine per chunk of this process's tasks (a list; a generator when streaming)."""
        if self._engines is not None:
            return self._engines
        return (build() for _, build in self.chunk_engines())

    def chunk_engines(self) -> Iterator[tuple[tuple[int, int], ChunkBuild]]:
        """``((start, stop), build)`` per chunk of this process's tasks, in order.

        ``start:stop`` are the chunk's global task positions; ``build()`` returns its engine
        and ``build.batch`` holds the chunk's tasks. A streamed point reads the chunk's tasks
        but adapts them only when ``build`` is called, so a caller that skips a chunk (e.g. one
        already computed before a restart) pays no inner adaptation for it.
        """
        start = self.offset
        if self._engines is not None:
            for e in self._engines:
                stop = start + e.batch.num_tasks
                yield (start, stop), ChunkBuild(e.batch, functools.partial(_identity, e))
                start = stop
            return
        assert self.source is not None
        for b in self.source.chunks(self.chunk_size, self.lam.dtype, self.lam.device):
            stop = start + b.num_tasks
            yield (start, stop), ChunkBuild(b, functools.partial(self._build_engine, b))
            start = stop

    def _build_engine(self, b: TaskBatch) -> Engine:
        pb = self.problem
        return build_engine(pb.fm, pb.inner, pb.checked(b, self.lam), self.lam)

    @property
    def ids(self) -> list[Any]:
        """Ids of all ``M`` tasks, in item order."""
        if self._ids is None:
            local = self._batch.ids if self._batch is not None else self._source_ids()
            self._ids = self.reduce.objects(list(local))
        return self._ids

    def tasks_fingerprint(self) -> dict[str, Any]:
        """What identifies this point's tasks (cached). Stacked: a digest of every tensor, weight
        and id (ids by ``repr``). Streamed: the ids, ``M`` and a digest of every chunk (one read
        of the data, without adaptation)."""
        if self._fingerprint is None:
            self._fingerprint = self._tasks_fingerprint()
        return self._fingerprint

    def _tasks_fingerprint(self) -> dict[str, Any]:
        if self.source is None:
            return {"kind": "stacked", "batch": batch_digest(self.batch), "M": self.num_local}
        src = self.source
        # every chunk: one read of the data (no inner adaptation), far cheaper than any solve's
        # passes, so that a stored solve is bound to all of the tasks, not only the first chunk
        chunks = [
            batch_digest(b) for b in src.chunks(self.chunk_size, self.lam.dtype, self.lam.device)
        ]
        lo = src.offset
        return {
            "kind": "streamed",
            "ids": digest([repr(i) for i in src.ids[lo : lo + src.num_tasks]]),
            "M": src.total_tasks,
            "shard": [lo, lo + src.num_tasks],
            "chunks": digest(chunks),
        }

    def _source_ids(self) -> list[Any]:
        assert self.source is not None
        lo = self.source.offset
        return self.source.ids[lo : lo + self.source.num_tasks]

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(c [M], W [M, n], V [M, m])`` of all tasks (streamed points read the data once)."""
        if self._batch is not None:
            parts = [self._batch.weights()]
        else:
            assert self.source is not None
            dt, dev = self.lam.dtype, self.lam.device
            parts = [b.weights() for b in self.source.chunks(self.chunk_size, dt, dev)]
        return self.cat_items(parts)

    def _local_cat(self, parts: list[Tensor], block: int) -> Tensor:
        if parts:
            return torch.cat(parts)
        width = () if block == 0 else (self._width(block),)
        return self.lam.new_zeros((0, *width))

    def item_widths(self) -> tuple[int, int]:
        """``(n, m)``: support and query points per task."""
        src = self._batch if self._batch is not None else self.source
        assert src is not None
        return src.n_support, src.n_query

    def _width(self, block: int) -> int:
        return self.item_widths()[block - 1]

    # ---- reductions over chunks and processes ----------------------------------------------
    def _cat(self, fn: Callable[[Any], Tensor], empty: Callable[[], Tensor]) -> Tensor:
        parts = [fn(e) for e in self.engines]
        return self.reduce.cat(torch.cat(parts) if parts else empty())

    def _sum(self, fn: Callable[[Any], Tensor], like: Tensor) -> Tensor:
        out = torch.zeros_like(like)
        for e in self.engines:
            out = out + fn(e)
        return self.reduce.sum(out)

    def _local_slices(self) -> Iterator[tuple[Any, slice]]:
        """``(engine, global slice of its tasks)`` for this process's chunks."""
        for (start, stop), build in self.chunk_engines():
            yield build(), slice(start, stop)

    # ---- values and gradients ------------------------------------------------------------
    def adapted(self) -> Tensor:
        """Adapted parameters ``Θ_i [M, P]`` (flat layout)."""
        return self._cat(lambda e: e.adapted(), lambda: self.lam.new_zeros(0, self.lam.shape[0]))

    def task_losses(self) -> Tensor:
        """``L_O^i(θ_i(λ)) [M]``."""
        return self._cat(lambda e: e.task_losses(), lambda: self.lam.new_zeros(0))

    def outer_loss(self) -> Tensor:
        """``Σ_i c_i L_O^i`` (no damping term)."""
        zero = self.lam.new_zeros(())
        return self._sum(lambda e: (e.batch.task_weight * e.task_losses()).sum(), zero)

    def objective(self) -> Tensor:
        """``F(λ)`` including the damping term ``(δ/2)‖λ‖²``."""
        return self._damped_value(self.outer_loss())

    def _damped_value(self, loss: Tensor) -> Tensor:
        """``loss + (δ/2)‖λ‖²``: the objective's damping term, in one place (its gradient is
        :meth:`_damped`'s)."""
        return loss + 0.5 * self.damping * (self.lam * self.lam).sum()

    def _damped(self, total: Tensor, x: Tensor) -> Tensor:
        """``total + δx``: the one place the objective's damping ``δ`` enters a gradient
        (``x = λ``) or a Hessian product (``x = d``); the solve damping ``δ'`` lives in the
        :class:`~metafluence.bilevel.curvature.Curvature` only."""
        return total + self.damping * x

    def grad_all(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradient of ``Φ = Σ c_k F_k`` in ``(λ, c, W, V)``; λ-block includes ``δλ``."""
        parts = [e.grad_all() for e in self.engines]
        g_l = torch.zeros_like(self.lam)
        for p in parts:
            g_l = g_l + p[0]
        g_l = self._damped(self.reduce.sum(g_l), self.lam)
        return (g_l, *self.cat_items([p[1:] for p in parts]))

    def cat_items(self, parts: Sequence[Sequence[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-item blocks ``(c [M], W [M, n], V [M, m])`` from this process's chunks' blocks
        (in chunk order), concatenated over all processes."""
        return tuple(  # type: ignore[return-value]
            self.reduce.cat(self._local_cat([p[i] for p in parts], i)) for i in range(3)
        )

    def outer_grad(self) -> Tensor:
        """``Σ_i c_i g_i`` ``[P]``: the gradient of the outer losses, without ``δλ`` (the
        gradient of a target ``f``)."""
        return self._sum(lambda e: e.grad_all()[0], self.lam)

    def meta_grad(self) -> Tensor:
        """``∇F(λ) = Σ_i c_i g_i + δλ`` ``[P]``."""
        return self._damped(self.outer_grad(), self.lam)

    def value_and_grad(self) -> tuple[Tensor, Tensor]:
        """``(F(λ), ∇F(λ))`` from one pass over the tasks: the gradient pass's ``c``-block
        ``∂_{c_k} Φ = F_k`` gives the losses, ``F = Σ c_k F_k + (δ/2)‖λ‖²``."""
        g_l, f = torch.zeros_like(self.lam), self.lam.new_zeros(())
        for e in self.engines:
            g, dc = e.grad_all()[:2]
            g_l, f = g_l + g, f + (e.batch.task_weight * dc).sum()
        g_l, f = self.reduce.sum(g_l), self.reduce.sum(f)
        return self._damped_value(f), self._damped(g_l, self.lam)

    def task_grads(self) -> Tensor:
        """Total gradients ``g_i [M, P]`` (materialised: use only where needed)."""
        return self._cat(lambda e: e.task_grads(), lambda: self.lam.new_zeros(0, self.lam.shape[0]))

    # ---- second order ----------------------------------------------------------------------
    def hvp_all(
        self,
        dlam: Tensor,
        dc: Tensor | None = None,
        dW: Tensor | None = None,
        dV: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``∇²(Φ + δ/2‖λ‖²) · (dλ, dc, dW, dV)`` blocks, exact (mixed weight derivatives).

        ``dc [M]``, ``dW [M, n]``, ``dV [M, m]`` cover all tasks (None = 0); so do the outputs.
        """
        h_l = torch.zeros_like(dlam)
        parts = []
        for e, sl in self._local_slices():
            c, W, V = e.batch.weights()
            part = e.hvp_all(
                dlam,
                torch.zeros_like(c) if dc is None else dc[sl],
                torch.zeros_like(W) if dW is None else dW[sl],
                torch.zeros_like(V) if dV is None else dV[sl],
            )
            h_l = h_l + part[0]
            parts.append(part[1:])
        h_l = self._damped(self.reduce.sum(h_l), dlam)
        return (h_l, *self.cat_items(parts))

    def item_scores(
        self, s: Tensor, tape: ProductTape | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(c ⊙ ∂_c∇F·s [M], W ⊙ ∂_W∇F·s [M, n], V ⊙ ∂_V∇F·s [M, m])``: removal effects.

        One pass of the mixed product ``∇²Φ · (s, 0, 0, 0)`` with each chunk's own weights, so
        a streamed point never holds more than one chunk; none when ``s`` lies in the span of
        what ``tape`` recorded (the solve of ``s`` made while :meth:`recording`): the blocks
        are then read off its products (:mod:`._tape`).
        """
        a = tape.coefficients(s) if tape is not None else None
        if a is not None and tape is not None:
            parts = [
                self.weighted_item_blocks(b.batch, tape.chunk_blocks(i, a))
                for i, (_, b) in enumerate(self.chunk_engines())
            ]
            return self.cat_items(parts)
        return self.cat_items([self.chunk_item_scores(e, s) for e in self.engines])

    @staticmethod
    def chunk_item_scores(engine: Any, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`item_scores` of one chunk's tasks ``([k], [k, n], [k, m])``, this process only.

        ``cat_items`` of the chunks' blocks, in chunk order, is :meth:`item_scores`.
        """
        c, W, V = engine.batch.weights()
        _, h_c, h_w, h_v = engine.hvp_all(
            s, torch.zeros_like(c), torch.zeros_like(W), torch.zeros_like(V)
        )
        return BilevelPoint.weighted_item_blocks(engine.batch, (h_c, h_w, h_v))

    @staticmethod
    def weighted_item_blocks(batch: TaskBatch, blocks: Blocks) -> Blocks:
        """``(c ⊙ h_c, W ⊙ h_w, V ⊙ h_v)``: a chunk's item blocks along ``s`` as removal
        effects, weighted by the chunk's own weights."""
        c, W, V = batch.weights()
        return c * blocks[0], W * blocks[1], V * blocks[2]

    @contextlib.contextmanager
    def recording(self) -> Iterator[ProductTape]:
        """A :class:`~metafluence.bilevel._tape.ProductTape` of the exact products made here
        inside the block (e.g. a solve's): their directions and every chunk's item blocks
        along them, which the same backward passes give (:meth:`item_scores` ``tape=``)."""
        tape, before = ProductTape(), self._tape
        self._tape = tape
        try:
            yield tape
        finally:
            self._tape = before

    def removal_rhs(self, remove: Any) -> Tensor:
        """``Σ_{e∈R} ω_e ∂_{ω_e}∇F [P]``: λ-block of ``∇²Φ · (0, c⊙1_R, W⊙1_R, V⊙1_R)``.

        ``Φ`` is linear in ``c``: where a chunk loses whole tasks only, the block is their
        gradient ``Σ_{k∈R} c_k g_k``, one gradient pass over the removed tasks alone; chunks
        that lose nothing are skipped."""
        out = torch.zeros_like(self.lam)
        for e, sl in self._local_slices():
            local = _localise(remove, sl.start, sl.stop)
            if not local:
                continue
            if set(local) == {"task"}:
                sub = e.batch.select(sorted(set(local["task"])))
                fm, inner = self.problem.fm, self.problem.inner
                out = out + build_engine(fm, inner, sub, self.lam).grad_all()[0]
                continue
            w = e.batch.weights()
            masks = item_masks(local, *w)
            dirs = [torch.where(m, x, torch.zeros_like(x)) for m, x in zip(masks, w, strict=True)]
            out = out + e.hvp_all(torch.zeros_like(self.lam), *dirs)[0]
        return self.reduce.sum(out)

    def gamma_constant(self) -> float:
        """``Γ = Σ_i c_i ‖∇_θ L_O^i‖₁`` over the adapted block."""
        if self._gamma is None:
            fm, spec = self.problem.fm, self.problem.spec
            total = self.lam.new_zeros(())
            for e in self.engines:
                b = e.batch
                g = vmap(grad(fm.set_loss))(e.adapted(), b.xq, b.yq, b.query_weight)
                total = total + (b.task_weight * g[:, spec.p_fixed :].abs().sum(-1)).sum()
            self._gamma = float(self.reduce.sum(total))
        return self._gamma

    def hvp(self, D: Tensor, curvature: str = "exact") -> Tensor:
        """Total-Hessian product ``H d`` (damping ``δ`` included) for ``D [P]`` or ``[k, P]``."""
        check_curvature(curvature)
        if curvature == "exact":
            return self._on_rows(D, self._exact_total)
        if curvature == "gauss_newton":
            return self._on_rows(D, lambda Dk: self._sum(lambda e: self._gn_chunk(e, Dk), Dk))
        return self._on_rows(
            D,
            lambda Dk: (
                self._sum(lambda e: self._gamma_chunk(e, Dk), Dk) + self.gamma_constant() * Dk
            ),
        )

    def _exact_total(self, D: Tensor) -> Tensor:
        """``Σ_chunks hvp_exact(D)`` for rows ``D [k, P]`` (``k > 0``); while :meth:`recording`,
        each chunk's item blocks along ``D`` (from the same passes) go on the tape."""
        tape = self._tape
        if tape is None or not tape.valid:
            return self._sum(lambda e: e.hvp_exact(D), D)
        out, blocks = torch.zeros_like(D), []
        for e in self.engines:
            if hasattr(e, "hvp_rows"):
                h, *b = e.hvp_rows(D)
                blocks.append((b[0], b[1], b[2]))
            else:  # no item blocks with its products (an implicit map's): nothing to read off
                h = e.hvp_exact(D)
                tape.invalidate()
            out = out + h
        tape.record(D, blocks)
        return self.reduce.sum(out)

    def _on_rows(self, D: Tensor, total: Callable[[Tensor], Tensor]) -> Tensor:
        """``total(D) + δD`` for ``D [P]`` or ``[k, P]``: rows made dense (forward-mode
        tangents need the primal's layout), ``k = 0`` answered without the engines."""
        one = D.dim() == 1
        Dk = (D.unsqueeze(0) if one else D).contiguous()
        out = self._damped(total(Dk) if Dk.shape[0] else torch.zeros_like(Dk), Dk)
        return out[0] if one else out

    def _gn_chunk(self, e: Any, D: Tensor) -> Tensor:
        fm = self.problem.fm
        b = e.batch
        theta, dtheta = e.theta_jvp(D)
        m = b.n_query

        def task(th, dth, xq, yq, v, c):
            def logits_of(t):
                return fm.logits(t, xq)

            lg, jd = jvp(logits_of, (th,), (dth,))
            scale = (c * v / m).reshape(-1, *([1] * (lg.dim() - 1)))
            hd = logit_hessian_vp(fm.loss_fn, lg, yq, jd) * scale
            return vjp(logits_of, th)[1](hd)[0]

        per_task = vmap(task)
        Y = vmap(lambda dt: per_task(theta, dt, b.xq, b.yq, b.query_weight, b.task_weight))(dtheta)
        return e.theta_vjp(Y)

    def _gamma_chunk(self, e: Any, D: Tensor) -> Tensor:
        fm = self.problem.fm
        b = e.batch
        theta, dtheta = e.theta_jvp(D)

        def task(th, dth, xq, yq, v, c):
            def loss(t: Tensor) -> Tensor:
                return fm.set_loss(t, xq, yq, v)

            return c * jvp(grad(loss), (th,), (dth,))[1]

        per_task = vmap(task)
        Y = vmap(lambda dt: per_task(theta, dt, b.xq, b.yq, b.query_weight, b.task_weight))(dtheta)
        return e.theta_vjp(Y)

    def matvec(self, curvature: str = "exact"):
        """``x ↦ H x`` as a solver ``matvec`` on ``[P]`` or ``[k, P]`` (``δ'`` is added by the
        solve: :class:`~metafluence.bilevel.curvature.Curvature`)."""
        check_curvature(curvature)
        return functools.partial(self.hvp, curvature=curvature)

    # ---- diagnostics ---------------------------------------------------------------------
    def inner_report(self) -> dict[str, Any]:
        """Inner-solve health (implicit maps; cached engines only: a stream is not re-read)."""
        out: dict[str, Any] = {}
        if self._engines is None or not isinstance(self.problem.inner, Implicit):
            return out
        engines = self._engines
        norms = [getattr(e, "inner_grad_norm", None) for e in engines]
        found = [float(n) for n in norms if n is not None]
        if found or self.reduce.world > 1:
            out["inner_grad_norm"] = self.reduce.max(max(found, default=0.0))
            bad = sum(getattr(e, "inner_unconverged", 0) for e in engines)
            out["inner_unconverged_solves"] = int(self.reduce.sum(torch.tensor(float(bad))))
        return out
