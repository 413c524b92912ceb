"""Pure-PyTorch reference twins of every fast op (same names and signatures)."""

from __future__ import annotations

from .psg import psg_linear

__all__ = ["psg_linear"]
