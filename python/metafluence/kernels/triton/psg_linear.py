"""Triton kernel for ``psg_linear``: ``out[n] = grad_outputs[n]^T @ activations[n]``.

One program per ``(n, out-tile, in-tile)`` (flattened on grid axis 0, so any ``N`` fits): the
tile loop of :func:`._tiles.linear_tile` (``tl.dot`` over ``T`` in chunks of ``BLOCK_T``, IEEE
precision, no TF32: float32 results match the reference to ~1e-6), then the tile is stored.
One fixed configuration (the interpreter cannot autotune). Under ``TRITON_INTERPRET=1`` it runs
on CPU tensors; the interpreter costs ~6 ms per program per ``T`` chunk, hence the large tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import linear_tile

BLOCK_O = 64
BLOCK_I = 64
BLOCK_T = 16


@triton.jit
def _psg_linear_kernel(
    act_ptr,
    gout_ptr,
    out_ptr,
    T,
    I,  # noqa: E741
    O,  # noqa: E741
    tiles_o,
    tiles_i,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # float32 or float64 only: accumulate in the input precision
    acc, n, offs_o, offs_i, mask_o, mask_i = linear_tile(
        act_ptr,
        gout_ptr,
        pid,
        tiles_o,
        tiles_i,
        T,
        I,
        O,
        BLOCK_O,
        BLOCK_I,
        BLOCK_T,
        out_ptr.dtype.element_ty,
    )
    out_ptrs = out_ptr + n * O * I + offs_o[:, None] * I + offs_i[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_i[None, :])


def psg_linear(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """Triton ``psg_linear``. Inputs are validated by :func:`metafluence.ops.psg_linear`;
    here they only need the same dtype (float32/float64) and device."""
    a = activations.contiguous()
    g = grad_outputs.contiguous()
    n, t, i = a.shape
    o = g.shape[2]
    out = torch.empty((n, o, i), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if t == 0:
        return out.zero_()
    tiles_o = triton.cdiv(o, BLOCK_O)
    tiles_i = triton.cdiv(i, BLOCK_I)
    grid = (n * tiles_o * tiles_i,)
    _psg_linear_kernel[grid](
        a, g, out, t, i, o, tiles_o, tiles_i, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_T=BLOCK_T
    )
    return out
