"""Pure-PyTorch reference twins of every fast op (same names and signatures)."""

from __future__ import annotations

from .psg import psg_linear
from .psg_reduce import psg_linear_dot, psg_linear_sqnorm

__all__ = ["psg_linear", "psg_linear_dot", "psg_linear_sqnorm"]
