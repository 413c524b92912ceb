"""Tile loops shared by the Triton kernels (``@triton.jit`` helpers, inlined into each kernel
that calls them). Imports triton at import time, like the kernel modules that use it: import it
only once a Triton backend has been chosen."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def linear_tile(
    act_ptr,
    gout_ptr,
    pid,
    tiles_o,
    tiles_i,
    T,
    I,  # noqa: E741
    O,  # noqa: E741
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ACC: tl.constexpr,
):
    """Program ``pid``'s tile of ``G_n = Σ_t grad_outputs[n, t]ᵀ activations[n, t]`` (``[O, I]``;
    ``activations [N, T, I]``, ``grad_outputs [N, T, O]`` contiguous): ``pid`` enumerates
    ``(n, out-tile, in-tile)`` on ``tiles_o x tiles_i`` tiles per sample; ``tl.dot`` over ``T``
    in chunks of ``BLOCK_T`` (IEEE precision, no TF32), accumulated in ``ACC``. Returns the
    ``[BLOCK_O, BLOCK_I]`` tile, ``n``, the tile's row and column indices and their masks."""
    n = pid // (tiles_o * tiles_i)
    to = (pid % (tiles_o * tiles_i)) // tiles_i
    ti = pid % tiles_i
    offs_o = to * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = ti * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_t = tl.arange(0, BLOCK_T)
    mask_o = offs_o < O
    mask_i = offs_i < I
    act_n = act_ptr + n * T * I
    gout_n = gout_ptr + n * T * O
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        mask_t = t < T
        # grad_outputs[n, t, o] loaded transposed as [BLOCK_O, BLOCK_T]
        g = tl.load(
            gout_n + t[None, :] * O + offs_o[:, None],
            mask=mask_o[:, None] & mask_t[None, :],
            other=0.0,
        )
        a = tl.load(
            act_n + t[:, None] * I + offs_i[None, :],
            mask=mask_t[:, None] & mask_i[None, :],
            other=0.0,
        )
        acc += tl.dot(g, a, input_precision="ieee")
    return acc, n, offs_o, offs_i, mask_o, mask_i
