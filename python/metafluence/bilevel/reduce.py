"""Reductions across processes: how a point combines its tasks with other processes' tasks.

A problem holds one :class:`Reduction`; every sum over tasks a point computes ends with
``reduce.sum`` and every per-item output with ``reduce.cat``, so one process (:class:`LocalReduce`,
identities) and many (``distributed.DistReduce``, collectives) share all the code above.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Reduction(Protocol):
    """``rank`` of ``world`` processes; ``sum(t)``: ``Σ_ranks t``; ``cat(t)``: the ranks' ``t``
    concatenated along dim 0 in rank order; ``objects(xs)``: the ranks' lists concatenated;
    ``max(x)``: the largest. Every rank receives every result."""

    rank: int
    world: int

    def sum(self, t: Tensor) -> Tensor: ...

    def cat(self, t: Tensor) -> Tensor: ...

    def objects(self, xs: list[Any]) -> list[Any]: ...

    def max(self, x: float) -> float: ...


class LocalReduce:
    """The :class:`Reduction` of a single process: identities."""

    rank = 0
    world = 1

    def sum(self, t: Tensor) -> Tensor:
        return t

    def cat(self, t: Tensor) -> Tensor:
        return t

    def objects(self, xs: list[Any]) -> list[Any]:
        return xs

    def max(self, x: float) -> float:
        return x
