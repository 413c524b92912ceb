"""Inner maps ``θ_i(λ, w_i)`` (math.md §1): configuration objects.

- :class:`Unrolled` — MAML: ``θ⁰ = λ``, ``θ^{t+1} = θ^t − α ∇_θ L_I(θ^t; S, w)``, ``T`` steps,
  differentiated through (second order), or with ``first_order=True`` ``dθ/dλ = I``.
- :class:`Implicit` — iMAML / proximal: ``θ = argmin_θ L_I(θ; S, w) + (γ/2)‖θ − λ‖²``,
  differentiated by the implicit function theorem with inner solves on
  ``A = ∇²_θ L_I + γI`` (``solver`` = ``"cg" | "direct" | "woodbury" | "ekfac"``).
- :class:`HeadOnly` — ANIL: only the parameters under ``head`` adapt (by 1. or 2.); the body is λ.

The engines that evaluate them live in :mod:`metafluence.bilevel.unrolled` and
:mod:`metafluence.bilevel.implicit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

INNER_SOLVERS = ("cg", "direct", "woodbury", "ekfac")


@dataclass(frozen=True)
class Unrolled:
    """``steps`` gradient steps of size ``lr`` on the support loss (MAML).

    ``adapt``: names/prefixes of the adapted parameters (None = all).
    """

    steps: int = 5
    lr: float = 0.4
    first_order: bool = False
    adapt: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if int(self.steps) < 0:
            raise ValueError(f"Unrolled(steps={self.steps}): expected steps >= 0")
        if not float(self.lr) > 0:
            raise ValueError(f"Unrolled(lr={self.lr}): expected lr > 0")


@dataclass(frozen=True)
class Implicit:
    """Proximal inner problem ``argmin_θ L_I(θ) + (reg/2)‖θ − λ‖²`` (iMAML).

    The forward solve runs ``steps`` gradient steps of size ``lr`` from ``θ = λ`` and then up
    to ``newton_steps`` Newton steps with the inner solver until ``‖∇_θ G‖ ≤ tol``.
    ``rtol``/``maxiter`` control the inner CG.
    """

    reg: float = 1.0
    solver: str = "cg"
    steps: int = 0
    lr: float = 0.1
    newton_steps: int = 20
    tol: float = 1e-10
    rtol: float = 1e-10
    maxiter: int = 500
    adapt: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not float(self.reg) > 0:
            raise ValueError(f"Implicit(reg={self.reg}): expected reg > 0")
        if self.solver not in INNER_SOLVERS:
            raise ValueError(f"Implicit(solver={self.solver!r}): expected one of {INNER_SOLVERS}")
        if int(self.steps) < 0 or int(self.newton_steps) < 0:
            raise ValueError("Implicit: steps and newton_steps must be >= 0")


def HeadOnly(  # noqa: N802 - a factory that reads like a class, as in the public API
    head: str | Sequence[str] = "head",
    steps: int = 5,
    lr: float = 0.4,
    first_order: bool = False,
    reg: float | None = None,
    solver: str = "cg",
    **implicit_kwargs: Any,
) -> Unrolled | Implicit:
    """ANIL: adapt only ``head`` (a parameter name prefix, or several).

    With ``reg=None`` the head is adapted by ``steps`` unrolled steps of size ``lr``; with
    ``reg=γ`` by the proximal (implicit) map.
    """
    heads = (head,) if isinstance(head, str) else tuple(head)
    if reg is None:
        return Unrolled(steps=steps, lr=lr, first_order=first_order, adapt=heads)
    return Implicit(
        reg=reg,
        solver=solver,
        steps=0 if steps is None else steps,
        lr=lr,
        adapt=heads,
        **implicit_kwargs,
    )
