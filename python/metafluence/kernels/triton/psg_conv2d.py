"""Triton kernels for ``psg_conv2d``, ``psg_conv2d_sqnorm`` and ``psg_conv2d_dot``.

Implicit GEMM: per sample ``n`` and group, ``G_n [Og, Kg] = g_n [Og, T] @ U_n [T, Kg]`` with
``U_n[t, k] = x[n, c, y·sh + i·dh − ph, x·sw + j·dw − pw]`` (``t = (y, x)``, ``k = (c, i, j)``,
zero outside the input). One program per ``(n, group, out-tile, k-tile)`` (flattened on grid
axis 0) forms its ``BLOCK_O x BLOCK_K`` tile of ``G_n`` in registers (``tl.dot`` over ``T`` in
chunks of ``BLOCK_T``, the ``U`` chunk gathered from the input with masks -- the unfolded input
never reaches memory), then stores it (``psg_conv2d``), or reduces it with itself
(``sqnorm``) or with the matching tile of every vector (``dot``) into one partial sum per tile,
summed over tiles by the wrapper. One fixed configuration (the interpreter cannot autotune).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_O = 32
BLOCK_K = 32
BLOCK_T = 32

Pair = tuple[int, int]


@triton.jit
def _kernel(
    act_ptr,
    gout_ptr,
    vec_ptr,
    out_ptr,
    C,
    H,
    W,
    O,  # noqa: E741
    Wo,
    T,
    M,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    GROUPS: tl.constexpr,
    tiles_o,
    tiles_k,
    MODE: tl.constexpr,  # 0: store the tile, 1: its squared sum, 2: its dots with M vectors
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    per_group = tiles_o * tiles_k
    n = pid // (GROUPS * per_group)
    gi = (pid % (GROUPS * per_group)) // per_group
    to = (pid % per_group) // tiles_k
    tk = pid % tiles_k
    cg = C // GROUPS
    og = O // GROUPS
    kg = cg * KH * KW
    offs_o = to * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_k = tk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_o = offs_o < og
    mask_k = offs_k < kg
    c = offs_k // (KH * KW)
    i = (offs_k // KW) % KH
    j = offs_k % KW
    act_n = act_ptr + (n * C + gi * cg) * H * W
    gout_n = gout_ptr + (n * O + gi * og) * T
    offs_t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=out_ptr.dtype.element_ty)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        mask_t = t < T
        g = tl.load(
            gout_n + offs_o[:, None] * T + t[None, :],
            mask=mask_o[:, None] & mask_t[None, :],
            other=0.0,
        )
        # the [BLOCK_T, BLOCK_K] chunk of the unfolded input, gathered (zero outside the input)
        ih = (t // Wo)[:, None] * SH + i[None, :] * DH - PH
        iw = (t % Wo)[:, None] * SW + j[None, :] * DW - PW
        ok = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        u = tl.load(
            act_n + (c[None, :] * H + ih) * W + iw,
            mask=mask_t[:, None] & mask_k[None, :] & ok,
            other=0.0,
        )
        acc += tl.dot(g, u, input_precision="ieee")
    mask = mask_o[:, None] & mask_k[None, :]
    tile_off = (gi * og + offs_o)[:, None] * kg + offs_k[None, :]
    if MODE == 0:
        tl.store(out_ptr + n * O * kg + tile_off, acc, mask=mask)
    elif MODE == 1:
        tl.store(out_ptr + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    else:
        for jj in range(0, M):
            v = tl.load(vec_ptr + jj * O * kg + tile_off, mask=mask, other=0.0)
            tl.store(out_ptr + pid * M + jj, tl.sum(tl.sum(acc * v, axis=1), axis=0))


def _launch_args(
    a: torch.Tensor, g: torch.Tensor, ks: Pair, st: Pair, pd: Pair, dl: Pair, groups: int
):
    n, c, h, w = a.shape
    o, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    kg = (c // groups) * ks[0] * ks[1]
    tiles_o = triton.cdiv(o // groups, BLOCK_O)
    tiles_k = triton.cdiv(kg, BLOCK_K)
    sizes = (c, h, w, o, wo, ho * wo)
    meta = dict(
        KH=ks[0], KW=ks[1], SH=st[0], SW=st[1], PH=pd[0], PW=pd[1], DH=dl[0], DW=dl[1],
        GROUPS=groups,
    )  # fmt: skip
    return n * groups * tiles_o * tiles_k, tiles_o, tiles_k, sizes, meta


def _empty(a: torch.Tensor, g: torch.Tensor) -> bool:
    """No work: ``N``, ``O``, ``C`` or the output positions ``Ho·Wo`` are 0."""
    return a.shape[0] * a.shape[1] * g.shape[1] * g.shape[2] * g.shape[3] == 0


def psg_conv2d(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> torch.Tensor:
    """Triton ``psg_conv2d`` (inputs validated by :mod:`metafluence.ops`)."""
    a, g = activations.contiguous(), grad_outputs.contiguous()
    n, c = a.shape[:2]
    out = torch.zeros(n, g.shape[1], c // groups, *kernel_size, dtype=a.dtype, device=a.device)
    if _empty(a, g):
        return out
    progs, tiles_o, tiles_k, sizes, meta = _launch_args(
        a, g, kernel_size, stride, padding, dilation, groups
    )
    _kernel[(progs,)](
        a, g, out, out, *sizes, 0, **meta, tiles_o=tiles_o, tiles_k=tiles_k, MODE=0,
        BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    return out


def _reduce(
    a: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor | None,
    geom: tuple[Pair, Pair, Pair, Pair, int],
) -> torch.Tensor:
    a, g = a.contiguous(), g.contiguous()
    n = a.shape[0]
    m = 0 if v is None else v.shape[0]
    shape = (n,) if v is None else (n, m)
    if _empty(a, g) or (v is not None and m == 0):
        return torch.zeros(shape, dtype=a.dtype, device=a.device)
    progs, tiles_o, tiles_k, sizes, meta = _launch_args(a, g, *geom)
    partial = torch.empty(progs * max(m, 1), dtype=a.dtype, device=a.device)
    vec = v.contiguous() if v is not None else partial
    _kernel[(progs,)](
        a, g, vec, partial, *sizes, m, **meta, tiles_o=tiles_o, tiles_k=tiles_k,
        MODE=1 if v is None else 2, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K, BLOCK_T=BLOCK_T,
    )  # fmt: skip
    per_n = progs // n
    return partial.view(n, per_n, *shape[1:]).sum(1)


def psg_conv2d_sqnorm(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> torch.Tensor:
    """Triton ``psg_conv2d_sqnorm`` (inputs validated by :mod:`metafluence.ops`)."""
    geom = (kernel_size, stride, padding, dilation, groups)
    return _reduce(activations, grad_outputs, None, geom)


def psg_conv2d_dot(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    vectors: torch.Tensor,
    kernel_size: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> torch.Tensor:
    """Triton ``psg_conv2d_dot`` (inputs validated by :mod:`metafluence.ops`)."""
    geom = (kernel_size, stride, padding, dilation, groups)
    return _reduce(activations, grad_outputs, vectors, geom)
