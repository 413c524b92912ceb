"""Inner maps: ``mf.inner.Unrolled``, ``mf.inner.Implicit``, ``mf.inner.HeadOnly``."""

from .bilevel.inner import HeadOnly, Implicit, Unrolled

__all__ = ["HeadOnly", "Implicit", "Unrolled"]
