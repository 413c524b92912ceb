"""Shared hypothesis settings and tensor builders for the fuzz tests.

Tensors are drawn from a seeded ``torch.Generator`` (hypothesis draws the seed and the shapes),
so a failing example is reproduced exactly by its printed arguments.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests._close import assert_close_maxnorm

#: modest example counts, no deadline (the machine is shared; timings vary)
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FAST, max_examples=12)

dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2**31 - 1)

#: comparison tolerance per dtype (relative to the largest magnitude involved)
RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def randn(shape: tuple[int, ...], seed: int, dtype: torch.dtype, layout: str = "c") -> torch.Tensor:
    """Standard-normal tensor of ``shape``: contiguous (``"c"``), a strided slice of a larger
    buffer (``"s"``: every other element of the last dim) or a transposed view (``"t"``: last two
    dims swapped in memory). Values are identical for every layout."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "c" or len(shape) < 2:
        return base
    if layout == "s":
        buf = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        buf[..., ::2] = base
        return buf[..., ::2]
    out = base.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert torch.equal(out, base)
    return out


layouts = st.sampled_from(["c", "s", "t"])


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``max|out - ref| <= RTOL[dtype] * max(1, max|ref|)`` (``tests/_close.py``)."""
    assert_close_maxnorm(out, ref, RTOL[dtype], what)


def require_kanjivg() -> None:
    """Skip the calling test when the KanjiVG stroke data (the glyph dataset) is missing."""
    from metafluence.data.glyphs import kanjivg_dir

    try:
        kanjivg_dir()
    except ImportError as e:
        pytest.skip(str(e))
