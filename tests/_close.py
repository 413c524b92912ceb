"""How tests compare floating-point results, in one place.

Rounding noise depends on the CPU's kernels (vector width, summation order, threads), so a
float32 test must never compare two noisy values element-wise where the true value can be zero or
tiny (a conv bias before BatchNorm has a structurally zero gradient: both sides are pure noise).
Every comparison here is relative to the size of the *whole* result:

- :func:`assert_close_maxnorm` — ``max|out − ref| ≤ rtol · max(1, max|ref|)`` over one tensor
  (kernels against their reference twins: the error of a sum of products scales with the
  largest entry, not with each entry);
- :func:`assert_close_normwise` — ``‖out − ref‖₂ ≤ rtol · ‖ref‖₂`` over all entries at once,
  where ``out``/``ref`` may be tensors or dicts of tensors (all parameters of a model together).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

TensorOrDict = Tensor | Mapping[str, Tensor]


def _flat(x: TensorOrDict) -> Tensor:
    if isinstance(x, Mapping):
        keys = sorted(x)
        if not keys:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([x[k].detach().reshape(-1).double() for k in keys])
    return x.detach().reshape(-1).double()


def rel_err(out: TensorOrDict, ref: TensorOrDict) -> float:
    """``‖out − ref‖₂ / ‖ref‖₂`` over all entries, computed in float64 (0 when both are empty)."""
    if isinstance(out, Mapping) and isinstance(ref, Mapping):
        assert sorted(out) == sorted(ref), f"keys {sorted(out)} vs {sorted(ref)}"
    a, b = _flat(out), _flat(ref)
    assert a.shape == b.shape, f"shape {list(a.shape)} vs {list(b.shape)}"
    if b.numel() == 0:
        return 0.0
    den = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    return num / den if den > 0 else num


def assert_close_normwise(
    out: TensorOrDict, ref: TensorOrDict, rtol: float, what: str = ""
) -> None:
    """``‖out − ref‖₂ ≤ rtol · ‖ref‖₂`` over every entry (of every tensor of a dict) at once."""
    if isinstance(out, Tensor) and isinstance(ref, Tensor):
        assert out.shape == ref.shape, f"{what}: shape {list(out.shape)} vs {list(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def assert_close_maxnorm(out: Tensor, ref: Tensor, rtol: float, what: str = "") -> None:
    """``max|out − ref| ≤ rtol · max(1, max|ref|)``; shapes and dtypes equal, bools exact."""
    assert out.shape == ref.shape, f"{what}: shape {list(out.shape)} vs {list(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} vs {ref.dtype}"
    if ref.numel() == 0:
        return
    if ref.dtype == torch.bool:
        assert torch.equal(out, ref), what
        return
    scale = float(ref.abs().max().clamp_min(1.0))
    err = float((out - ref).abs().max())
    assert err <= rtol * scale, f"{what}: max err {err:.3e} (scale {scale:.3e})"
