"""Argument checks shared by every layer (no metafluence imports: the bottom of the stack).

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a bad value, with a message
that names the argument.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_DAMPING", "check_bool", "check_finite", "check_float", "check_int"]

#: the largest damping (``δ``, ``δ'``) accepted: ``H + δI`` must stay representable (float32
#: overflows at 3.4e38; eigenvalues and residuals of ``H + δI`` are squared in norms)
MAX_DAMPING = 1e30


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a ``bool`` (a Python or numpy bool only: no ints, strings or None)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


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


def check_finite(t: Tensor, name: str, dtype: torch.dtype | None = None) -> Tensor:
    """``t`` cast to ``dtype`` (the dtype the model computes in; floating tensors only), after
    checking that it is finite *there*: float64 values beyond float32's range pass a float64
    check but become Inf in a float32 model. ValueError names ``name`` and says which."""
    if not t.is_floating_point() and not t.is_complex():
        return t
    out = t if dtype is None or t.dtype == dtype else t.to(dtype)
    if out.device.type == "meta" or bool(torch.isfinite(out).all()):
        return out
    if out is not t and bool(torch.isfinite(t).all()):
        big = float(t.abs().max())
        raise ValueError(
            f"{name} has values up to {big:.3g} that overflow {dtype} (the dtype the model "
            f"computes in: they become Inf there); rescale the data or compute in {t.dtype}"
        )
    raise ValueError(f"{name} contains NaN or Inf")
