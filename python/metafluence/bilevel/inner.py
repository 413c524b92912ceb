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

from .._checks import check_float, check_int

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
        check_int(self.steps, "Unrolled(steps)", minimum=0)
        check_float(self.lr, "Unrolled(lr)", positive=True)


@dataclass(frozen=True)
class Implicit:
    """Proximal inner problem ``argmin_θ L_I(θ) + (reg/2)‖θ − λ‖²`` (iMAML).

    The forward solve runs ``steps`` gradient steps of size ``lr`` from ``θ = λ`` and then up
    to ``newton_steps`` Newton steps with the inner solver until ``‖∇_θ G‖ ≤ tol``.
    ``rtol``/``maxiter`` control the inner CG (``rtol`` is floored at ``1e3·eps`` of the
    dtype, 1.2e-4 in float32, where residuals stagnate: below it every solve ran to ``maxiter``).
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
        check_float(self.reg, "Implicit(reg)", positive=True)
        if self.solver not in INNER_SOLVERS:
            raise ValueError(f"Implicit(solver={self.solver!r}): expected one of {INNER_SOLVERS}")
        check_int(self.steps, "Implicit(steps)", minimum=0)
        check_int(self.newton_steps, "Implicit(newton_steps)", minimum=0)
        check_int(self.maxiter, "Implicit(maxiter)", minimum=1)
        check_float(self.lr, "Implicit(lr)", positive=True)
        check_float(self.tol, "Implicit(tol)", minimum=0.0)
        check_float(self.rtol, "Implicit(rtol)", minimum=0.0)


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
