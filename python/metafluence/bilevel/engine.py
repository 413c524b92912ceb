"""The engine contract: what the bilevel core asks of an inner map, for one chunk of tasks.

An engine holds one chunk of ``M`` tasks (a :class:`~metafluence.data.tasks.TaskBatch`) at a
fixed ``λ [P]`` and computes, batched over the chunk (never a Python loop over tasks), the
blocks of the *weighted meta-objective*

    Φ(λ, c, W, V) = Σ_k c_k L_O(Θ_k(λ, W_k); Q_k, V_k)

with ``Θ_k`` the inner map's adapted parameters (math.md §1, §3). :class:`BilevelPoint` sums the
blocks over chunks (and processes); the influence layer reads nothing else from an inner map.
An inner map plugs in by implementing :class:`Engine` and registering its class in
:data:`ENGINES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import Tensor

from ..data.tasks import TaskBatch
from .functional import FunctionalModel
from .implicit import ImplicitEngine
from .inner import Implicit, Unrolled
from .unrolled import UnrolledEngine


@runtime_checkable
class Engine(Protocol):
    """One chunk's computations at fixed ``λ`` (shapes: ``M`` tasks, ``n`` support and ``m``
    query points per task, ``k`` directions, ``P`` meta-parameters)."""

    batch: TaskBatch
    lam: Tensor

    def adapted(self) -> Tensor:
        """``Θ_k [M, P]`` (flat layout; the fixed block is ``λ``'s)."""
        ...

    def task_losses(self) -> Tensor:
        """``F_k = L_O(Θ_k; Q_k, V_k) [M]`` (unweighted by ``c``)."""
        ...

    def task_grads(self) -> Tensor:
        """Total gradients ``g_k = D_λ F_k [M, P]``."""
        ...

    def grad_all(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(∂_λ Φ [P], ∂_c Φ [M], ∂_W Φ [M, n], ∂_V Φ [M, m])``."""
        ...

    def hvp_all(
        self, dlam: Tensor, dc: Tensor, dW: Tensor, dV: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``∇²Φ · (dλ [P], dc [M], dW [M, n], dV [M, m])``, the same four blocks."""
        ...

    def hvp_exact(self, D: Tensor) -> Tensor:
        """``Σ_k c_k ∇²_λ F_k · d`` for each row of ``D [k, P]`` → ``[k, P]`` (no damping)."""
        ...

    def linearised(self) -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`hvp_all` as a function, with what products can share (a linearisation)
        computed once; kept for later calls within the engine's ``linearisation_budget``
        (:mod:`metafluence.bilevel._budget`) when it has one."""
        ...

    def theta_jvp(self, D: Tensor) -> tuple[Tensor, Tensor]:
        """``(Θ [M, P], dΘ [k, M, P])``, ``dΘ_k = (∂Θ_k/∂λ) d`` for ``D [k, P]``."""
        ...

    def theta_vjp(self, Y: Tensor) -> Tensor:
        """``Σ_k (∂Θ_k/∂λ)ᵀ y_k`` for ``Y [k, M, P]`` → ``[k, P]``."""
        ...


#: inner-map class → engine class (``HeadOnly`` is an :class:`Unrolled` map).
ENGINES: dict[type, Callable[[FunctionalModel, object, TaskBatch, Tensor], Engine]] = {
    Unrolled: UnrolledEngine,
    Implicit: ImplicitEngine,
}


def build_engine(fm: FunctionalModel, inner: object, batch: TaskBatch, lam: Tensor) -> Engine:
    """The engine of ``inner`` for the (already validated) ``batch`` at ``lam``."""
    for cls, make in ENGINES.items():
        if isinstance(inner, cls):
            return make(fm, inner, batch, lam)
    raise TypeError(
        f"no engine for inner map {type(inner).__name__}; expected one of "
        f"{[c.__name__ for c in ENGINES]}"
    )
