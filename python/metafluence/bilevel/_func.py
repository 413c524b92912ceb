"""Typed two-output wrappers of ``torch.func.jvp`` / ``vjp`` (their stubs allow a third, aux)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def jvp(fn: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]):
    """``(fn(*primals), J · tangents)``."""
    out = torch.func.jvp(fn, primals, tangents)
    return out[0], out[1]


def vjp(fn: Callable[..., Any], *primals: Any) -> tuple[Any, Callable[..., Any]]:
    """``(fn(*primals), pullback)``."""
    out = torch.func.vjp(fn, *primals)
    return out[0], out[1]
