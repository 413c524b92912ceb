"""Common contract of the metafluence solvers.

Every total-Hessian / inner-Hessian solver takes a linear operator ``matvec`` and right-hand
sides ``b`` and returns a :class:`SolveResult`.

Shapes
------
``b`` is either a single vector ``[P]`` or ``k`` right-hand sides stored as **rows** ``[k, P]``.
``matvec`` receives a tensor of the same rank as ``b``:

* ``b`` of shape ``[P]``: ``matvec`` gets and returns ``[P]``;
* ``b`` of shape ``[k, P]``: ``matvec`` gets and returns ``[k', P]`` with ``k' <= k`` (solvers
  may apply it to a subset of still-active rows, or to one row ``[1, P]``).

The operator ``A`` is assumed symmetric; every solver solves ``(A + damping I) x = b``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._checks import check_float, check_int

__all__ = ["Matvec", "SolveResult"]

Matvec = Callable[[Tensor], Tensor]
"""A symmetric linear operator ``v -> A v`` acting on rows (see the module docstring)."""


@dataclass
class SolveResult:
    """Result of a linear solve ``(A + damping I) x = b``.

    Attributes:
        x: the solution, same shape as ``b``: ``[P]`` or ``[k, P]``.
        iters: iterations performed (maximum over columns); 0 for direct methods.
        residual: relative residual ``||b - (A + damping I) x|| / ||b||`` per column, computed from
            the operator (not from a recurrence): shape ``[]`` for ``b`` of shape ``[P]``, ``[k]``
            for ``[k, P]``; 0 for zero columns.
        converged: whether every column reached the requested tolerance.
        column_converged: per-column convergence, same shape as ``residual`` (bool).
        negative_curvature: ``solve_cg`` only: some column met ``pᵀ A p <= 0``.
        info: solver-specific details (``scale`` for Neumann, ``eigenvalues`` for Arnoldi, ...).
    """

    x: Tensor
    iters: int
    residual: Tensor
    converged: bool
    column_converged: Tensor | None = None
    negative_curvature: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def check_damping(damping: float, *, positive: bool = False) -> float:
    """Validate ``damping`` (finite, ``>= 0``, or ``> 0`` when ``positive``) and return it."""
    if isinstance(damping, Tensor):
        if damping.numel() != 1:
            raise ValueError(
                f"damping must be a float, got a tensor of shape {list(damping.shape)}"
            )
        damping = float(damping.item())
    return check_float(damping, "damping", minimum=0.0, positive=positive)


def check_positive_int(value: int, name: str, *, minimum: int = 1) -> int:
    """Validate an integer argument ``>= minimum``."""
    return check_int(value, name, minimum=minimum)


def check_finite(t: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``t`` holds NaN or Inf (one host sync).

    Skipped for meta tensors and inside ``torch.func`` transforms (no data to read there)."""
    if t.device.type == "meta" or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return t
    if t.numel() and not bool(torch.isfinite(t).all().item()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def check_float_tensor(t: Any, name: str, *, finite: bool = True) -> Tensor:
    """``t`` must be a floating torch.Tensor (``TypeError`` otherwise), finite when ``finite``
    (``ValueError``); messages name ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}, expected a floating dtype")
    return check_finite(t, name) if finite else t


def check_same_device(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    """``ValueError`` if ``t`` and ``ref`` live on different devices."""
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; expected the same device"
        )


def check_device(device: Any, name: str = "device") -> torch.device | None:
    """Parse a device argument (``None``, a string or a ``torch.device``); a malformed string
    raises ``ValueError`` naming the argument instead of torch's ``RuntimeError``."""
    if device is None or isinstance(device, torch.device):
        return device
    if not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a str or torch.device, got {type(device).__name__}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name}={device!r} is not a valid torch device ({e})") from None


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """``dtype`` must be a floating ``torch.dtype`` (``TypeError`` naming the argument)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating torch.dtype, got {dtype!r}")
    return dtype


def as_rows(b: Tensor, name: str = "b") -> tuple[Tensor, bool]:
    """View ``b`` ([P] or [k, P]) as rows ``[k, P]``; also return whether ``b`` was 1-D.

    ``b`` must be a finite floating tensor (``TypeError`` / ``ValueError`` naming it)."""
    check_float_tensor(b, name)
    if b.dim() == 1:
        return b.unsqueeze(0), True
    if b.dim() == 2:
        return b, False
    raise ValueError(f"{name} has {b.dim()} dims, expected [P] or [k, P]")


def from_rows(x: Tensor, one_d: bool) -> Tensor:
    """Inverse of :func:`as_rows` for an output ``[k, ...]``."""
    return x[0] if one_d else x


class RowOperator:
    """Adapter applying a user ``matvec`` to rows ``[k', P]`` and adding ``damping * X``.

    When the right-hand side was 1-D the user's ``matvec`` only accepts ``[P]``; the adapter then
    calls it once per row. Counts rows processed (``rows``) and calls (``calls``) for diagnostics.
    """

    def __init__(self, matvec: Matvec, one_d: bool, damping: float = 0.0, name: str = "matvec"):
        if not callable(matvec):
            raise TypeError(f"{name} must be callable, got {type(matvec).__name__}")
        self.matvec = matvec
        self.one_d = one_d
        self.damping = damping
        self.name = name
        self.calls = 0
        self.rows = 0

    def _check(self, y: Tensor, x: Tensor) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(f"{self.name} returned {type(y).__name__}, expected a Tensor")
        if y.shape != x.shape:
            raise ValueError(
                f"{self.name} returned shape {list(y.shape)} for input {list(x.shape)}, "
                "expected the same shape"
            )
        if y.dtype != x.dtype:
            raise ValueError(f"{self.name} returned dtype {y.dtype} for input dtype {x.dtype}")
        if y.device != x.device:
            raise ValueError(
                f"{self.name} returned a tensor on {y.device} for an input on {x.device}"
            )
        return y

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        if self.one_d:
            ys = [self._check(self.matvec(row), row) for row in x]
            y = torch.stack(ys) if ys else torch.zeros_like(x)
        else:
            y = self._check(self.matvec(x), x)
        if self.damping != 0.0:
            y = y + self.damping * x
        return y


def tiny(dtype: torch.dtype) -> float:
    """Smallest positive normal number of ``dtype`` (guard for divisions)."""
    return float(torch.finfo(dtype).tiny)


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``."""
    return float(torch.finfo(dtype).eps)


def default_rtol(dtype: torch.dtype) -> float:
    """Tolerance used to call a direct solve converged: ``sqrt(eps)`` of ``dtype``."""
    return math.sqrt(eps(dtype))


def relative_residual(residual_norm: Tensor, b_norm: Tensor) -> Tensor:
    """``||r|| / ||b||`` per column, 0 where ``||b|| = 0`` and ``||r|| = 0``."""
    safe = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    rel = residual_norm / safe
    return torch.where(b_norm > 0, rel, torch.where(residual_norm > 0, torch.inf, 0.0))


def random_rows(
    k: int, dim: int, dtype: torch.dtype, device: torch.device | str | None, seed: int
) -> Tensor:
    """Deterministic standard-normal rows ``[k, dim]`` (drawn on the CPU, then moved)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn(k, dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
