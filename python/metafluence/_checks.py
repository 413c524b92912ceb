"""Argument checks shared by every layer (no metafluence imports: the bottom of the stack).

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, with a message
that names the argument.
"""

from __future__ import annotations

import math
import operator
from typing import Any

__all__ = ["check_float", "check_int"]


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (Python or numpy integer, not a bool or float), ``>= minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name}={out}: expected >= {minimum}")
    return out


def check_float(
    value: Any,
    name: str,
    *,
    minimum: float | None = None,
    positive: bool = False,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite ``float`` (``> 0`` when ``positive``; within ``[minimum,
    maximum]``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        and not hasattr(value, "__float__")
    ):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}={out}: expected a finite number")
    if positive and not out > 0:
        raise ValueError(f"{name}={out}: expected > 0")
    if minimum is not None and out < minimum:
        raise ValueError(f"{name}={out}: expected >= {minimum}")
    if maximum is not None and out > maximum:
        raise ValueError(f"{name}={out}: expected <= {maximum}")
    return out
