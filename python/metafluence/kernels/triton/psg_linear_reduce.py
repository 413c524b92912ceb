"""Triton kernels for ``psg_linear_sqnorm`` and ``psg_linear_dot``.

One program per ``(n, out-tile, in-tile)`` (flattened on grid axis 0). Each program forms its
``BLOCK_O x BLOCK_I`` tile of ``G_n = Σ_t grad_outputs[n, t]ᵀ activations[n, t]`` in registers
(:func:`._tiles.linear_tile`, the tile loop of ``psg_linear`` too), reduces it -- with itself
(``sqnorm``) or with the matching tile of every ``vectors[j]`` (``dot``) -- and stores one
partial sum per tile; the wrapper sums the partials over tiles. ``G_n`` never reaches memory.
One fixed configuration (the interpreter cannot autotune); large tiles keep the interpreter
(~6 ms per program per ``T`` chunk) usable in tests.
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
def _sqnorm_kernel(
    act_ptr,
    gout_ptr,
    partial_ptr,
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
    acc, _, _, _, _, _ = linear_tile(
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
        partial_ptr.dtype.element_ty,
    )
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _dot_kernel(
    act_ptr,
    gout_ptr,
    vec_ptr,
    partial_ptr,
    T,
    I,  # noqa: E741
    O,  # noqa: E741
    M,
    tiles_o,
    tiles_i,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    acc, _, offs_o, offs_i, mask_o, mask_i = linear_tile(
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
        partial_ptr.dtype.element_ty,
    )
    mask = mask_o[:, None] & mask_i[None, :]
    tile_off = offs_o[:, None] * I + offs_i[None, :]
    for j in range(0, M):
        v = tl.load(vec_ptr + j * O * I + tile_off, mask=mask, other=0.0)
        tl.store(partial_ptr + pid * M + j, tl.sum(tl.sum(acc * v, axis=1), axis=0))


def _grid(a: torch.Tensor, o: int) -> tuple[int, int, int]:
    return a.shape[0], triton.cdiv(o, BLOCK_O), triton.cdiv(a.shape[2], BLOCK_I)


def psg_linear_sqnorm(activations: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
    """Triton ``psg_linear_sqnorm`` (inputs validated by :mod:`metafluence.ops`)."""
    a = activations.contiguous()
    g = grad_outputs.contiguous()
    n, t, i = a.shape
    o = g.shape[2]
    if n == 0 or t == 0 or i == 0 or o == 0:
        return torch.zeros(n, dtype=a.dtype, device=a.device)
    _, tiles_o, tiles_i = _grid(a, o)
    partial = torch.empty(n * tiles_o * tiles_i, dtype=a.dtype, device=a.device)
    _sqnorm_kernel[(partial.numel(),)](
        a, g, partial, t, i, o, tiles_o, tiles_i, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, BLOCK_T=BLOCK_T
    )
    return partial.view(n, tiles_o * tiles_i).sum(1)


def psg_linear_dot(
    activations: torch.Tensor, grad_outputs: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """Triton ``psg_linear_dot`` (inputs validated by :mod:`metafluence.ops`)."""
    a = activations.contiguous()
    g = grad_outputs.contiguous()
    v = vectors.contiguous()
    n, t, i = a.shape
    o = g.shape[2]
    m = v.shape[0]
    if n == 0 or m == 0 or t == 0 or i == 0 or o == 0:
        return torch.zeros(n, m, dtype=a.dtype, device=a.device)
    _, tiles_o, tiles_i = _grid(a, o)
    tiles = tiles_o * tiles_i
    partial = torch.empty(n * tiles * m, dtype=a.dtype, device=a.device)
    _dot_kernel[(n * tiles,)](
        a,
        g,
        v,
        partial,
        t,
        i,
        o,
        m,
        tiles_o,
        tiles_i,
        BLOCK_O=BLOCK_O,
        BLOCK_I=BLOCK_I,
        BLOCK_T=BLOCK_T,
    )
    return partial.view(n, tiles, m).sum(1)
