"""A :class:`MetaProblem` whose points cover only this rank's tasks and reduce across ranks."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..bilevel.problem import MetaProblem


class DistReduce:
    """The :class:`~metafluence.bilevel.reduce.Reduction` over the ranks of ``group`` (all ranks
    get every result)."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group "
                "(or mf.distributed.init_from_env()) before building a ShardedProblem"
            )
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def sum(self, t: Tensor) -> Tensor:
        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def cat(self, t: Tensor) -> Tensor:
        t = t.detach().contiguous()
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n, group=self.group)
        counts = [int(s) for s in sizes]
        width = max(counts)
        pad = t.new_zeros((width, *t.shape[1:]))
        pad[: t.shape[0]] = t
        bufs = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(bufs, pad, group=self.group)
        return torch.cat([b[:c] for b, c in zip(bufs, counts, strict=True)])

    def objects(self, xs: list[Any]) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, list(xs), group=self.group)
        return [x for part in out for x in part]

    def max(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)


def ShardedProblem(problem: MetaProblem, group: Any = None) -> MetaProblem:  # noqa: N802
    """``problem`` with its tasks sharded over the ranks of ``group``.

    The same model, inner map, loss and damping, with the all-reduce of ``group`` as its
    reduction (``problem.with_reduce(DistReduce(group))``): rank ``r`` builds engines for tasks
    ``shard_range(M, r, world)`` and every reduction over tasks is completed across ranks, so all
    derived quantities (gradients, HVPs, solves, scores, edits, meta-training steps) are the
    single-process ones. All ranks must make the same calls with the same ``λ`` and tasks
    (collectives run in lock step). (A function, named like the class it used to be.)
    """
    if not isinstance(problem, MetaProblem):
        raise TypeError(f"problem must be a MetaProblem, got {type(problem).__name__}")
    return problem.with_reduce(DistReduce(group))


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment; returns ``(rank, world)``.

    ``backend`` defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``. Without
    torchrun's variables (``RANK``, ``WORLD_SIZE``) it is a single process: ``(0, 1)``, nothing
    initialised.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()
