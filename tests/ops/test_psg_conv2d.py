"""psg_conv2d / psg_conv2d_sqnorm / psg_conv2d_dot: every backend against the reference twins
(odd sizes, empty batches, strides, padding, dilation, groups, non-contiguous inputs, float32 and
float64), validation, opcheck, fake kernels, autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests._close import assert_close_maxnorm

import metafluence as mf
from metafluence import _loader
from metafluence.ops import _dispatch
from metafluence.reference import psg_conv2d as ref_psg
from metafluence.reference import psg_conv2d_dot as ref_dot
from metafluence.reference import psg_conv2d_sqnorm as ref_sqnorm

DTYPES = [torch.float64, torch.float32]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
OPS = ("psg_conv2d", "psg_conv2d_sqnorm", "psg_conv2d_dot")
HAS_CUDA = torch.cuda.is_available()
NATIVE_CPU = all(_loader.has_kernel(op, "cpu") for op in OPS)
NATIVE_CUDA = all(_loader.has_kernel(op, "cuda") for op in OPS)
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason=f"no native CPU kernel: {_loader.STATE}")
M = 3

# (N, C, H, W, O, kernel_size, stride, padding, dilation, groups)
GEOMS = [
    (0, 3, 5, 5, 4, 3, 1, 1, 1, 1),  # empty batch
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),  # one of everything
    (7, 3, 9, 7, 5, 3, 1, 1, 1, 1),  # odd sizes, padding
    (7, 4, 11, 9, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2),  # mixed pairs, groups
    (3, 6, 8, 8, 6, 3, 1, 1, 1, 6),  # depthwise
    (3, 6, 8, 8, 12, 3, 1, 1, 1, 3),  # grouped, channel multiplier 4
    (2, 5, 13, 13, 97, 3, 2, 2, 2, 1),  # 97 outputs (block edges), stride, dilation
    (97, 2, 4, 4, 3, 2, 1, 0, 1, 1),  # 97 samples
    (2, 3, 2, 2, 4, 3, 1, 0, 1, 1),  # kernel larger than the input: no output positions
    (2, 7, 10, 6, 33, (1, 3), 3, (0, 2), 1, 1),  # kernel edges (Kg = 21)
    # the CPU kernel's t-form (Kg <= 64, T >= 8 Kg + 64): vectors over output positions
    (5, 1, 28, 27, 13, 3, 1, 1, 1, 1),  # Kg = 9, T = 756: 3 chunks, a partial last vector
    (3, 3, 40, 37, 70, 3, 2, 1, 1, 1),  # Kg = 27, stride 2, 70 outputs: two blocks of <= 64
    (4, 1, 17, 17, 5, 1, 1, 0, 1, 1),  # Kg = 1 (1x1 conv of one channel)
    (2, 2, 12, 12, 5, 1, 1, 0, 1, 1),  # Kg = 2
    (3, 4, 18, 18, 6, 3, 1, 1, 2, 2),  # Kg = 18: groups, dilation
]
IDS = [f"g{i}" for i in range(len(GEOMS))]


def _assert_close(out, ref, dtype, what=""):
    assert_close_maxnorm(out.detach(), ref.detach(), RTOL[dtype], what)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _inputs(geom, dtype, m=M, device="cpu", seed=0):
    n, c, h, w, o, ks, st, pd, dl, groups = geom
    ks, st, pd, dl = map(_pair, (ks, st, pd, dl))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    ho = max(0, (h + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1)
    wo = max(0, (w + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1)
    g = torch.randn(n, o, ho, wo, generator=gen, dtype=dtype)
    v = torch.randn(m, o, c // groups, *ks, generator=gen, dtype=dtype)
    return x.to(device), g.to(device), v.to(device), (ks, st, pd, dl, groups)


def _check_all(x, g, v, geo, backend, dtype):
    _assert_close(mf.psg_conv2d(x, g, *geo, backend=backend), ref_psg(x, g, *geo), dtype, "psg")
    _assert_close(
        mf.psg_conv2d_sqnorm(x, g, *geo, backend=backend), ref_sqnorm(x, g, *geo), dtype, "sq"
    )
    _assert_close(
        mf.psg_conv2d_dot(x, g, v, *geo, backend=backend), ref_dot(x, g, v, *geo), dtype, "dot"
    )


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)


# ---- the reference twin against autograd of F.conv2d ----------------------------------------
@pytest.mark.parametrize("geom", GEOMS, ids=IDS)
def test_reference_matches_autograd(geom):
    x, g, v, geo = _inputs(geom, torch.float64)
    if g.shape[2] * g.shape[3] == 0:  # F.conv2d refuses a kernel larger than the input
        assert torch.equal(ref_psg(x, g, *geo), torch.zeros(2, 4, 3, 3, 3, dtype=torch.float64))
        return
    ks, st, pd, dl, groups = geo
    c, o = x.shape[1], g.shape[1]
    weight = torch.randn(o, c // groups, *ks, dtype=torch.float64, requires_grad=True)
    rows = []
    for i in range(x.shape[0]):
        out = F.conv2d(x[i : i + 1], weight, None, st, pd, dl, groups)
        (gw,) = torch.autograd.grad((out * g[i : i + 1]).sum(), weight)
        rows.append(gw)
    want = torch.stack(rows) if rows else torch.zeros(0, *weight.shape, dtype=torch.float64)
    _assert_close(ref_psg(x, g, *geo), want, torch.float64)


# ---- native (C++ CPU) ------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMS, ids=IDS)
def test_native_cpu_matches_reference(geom, dtype):
    x, g, v, geo = _inputs(geom, dtype)
    _check_all(x, g, v, geo, "native", dtype)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_native_cpu_threads_and_many_vectors(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # m = 70: two passes of 64; the second geometry takes the t-form
        for geom in ((5, 8, 9, 9, 40, 3, 1, 1, 1, 1), (5, 1, 20, 20, 40, 3, 1, 1, 1, 1)):
            x, g, v, geo = _inputs(geom, torch.float32, m=70)
            _check_all(x, g, v, geo, "native", torch.float32)
    finally:
        torch.set_num_threads(old)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_non_contiguous(dtype):
    x, g, v, geo = _inputs((5, 4, 9, 8, 6, 3, 2, 1, 1, 2), dtype)
    x_nc = x.contiguous(memory_format=torch.channels_last)
    g_nc = g.transpose(2, 3).contiguous().transpose(2, 3)
    v_nc = v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x_nc.is_contiguous() or g_nc.is_contiguous() or v_nc.is_contiguous())
    _check_all(x_nc, g_nc, v_nc, geo, "native", dtype)
    # the raw ops accept non-contiguous input too
    raw = torch.ops.metafluence.psg_conv2d_dot(x_nc, g_nc, v_nc, *geo)
    _assert_close(raw, ref_dot(x, g, v, *geo), dtype)


@needs_native
def test_native_cpu_empty_vectors_and_channels():
    x, g, _, geo = _inputs((4, 3, 5, 5, 2, 3, 1, 1, 1, 1), torch.float64)
    v0 = torch.zeros(0, 2, 3, 3, 3, dtype=torch.float64)
    assert mf.psg_conv2d_dot(x, g, v0, *geo, backend="native").shape == (4, 0)
    x0, g0 = torch.zeros(3, 0, 5, 5), torch.zeros(3, 2, 5, 5)
    assert mf.psg_conv2d(x0, g0, 3, 1, 1, backend="native").shape == (3, 2, 0, 3, 3)
    assert torch.equal(mf.psg_conv2d_sqnorm(x0, g0, 3, 1, 1, backend="native"), torch.zeros(3))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    for geom in (GEOMS[0], GEOMS[2], GEOMS[3]):
        x, g, v, geo = _inputs(geom, dtype, m=2)
        for req in (False, True):
            for t in (x, g, v):
                t.requires_grad_(req)
            args = [list(p) for p in geo[:4]] + [geo[4]]
            torch.library.opcheck(torch.ops.metafluence.psg_conv2d.default, (x, g, *args))
            torch.library.opcheck(torch.ops.metafluence.psg_conv2d_sqnorm.default, (x, g, *args))
            torch.library.opcheck(torch.ops.metafluence.psg_conv2d_dot.default, (x, g, v, *args))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck(backend):
    if backend == "native" and not NATIVE_CPU:
        pytest.skip("no native CPU kernel")
    x, g, v, geo = _inputs((2, 4, 5, 4, 4, (2, 3), (1, 2), 1, 1, 2), torch.float64, m=2)
    for t in (x, g, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: mf.psg_conv2d(a, b, *geo, backend=backend), (x, g))
    assert torch.autograd.gradcheck(
        lambda a, b: mf.psg_conv2d_sqnorm(a, b, *geo, backend=backend), (x, g)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: mf.psg_conv2d_dot(a, b, c, *geo, backend=backend), (x, g, v)
    )


@needs_native
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    geo = ([3, 3], [1, 1], [1, 1], [1, 1], 2)
    with FakeTensorMode():
        x, g, v = torch.empty(5, 4, 7, 7), torch.empty(5, 6, 7, 7), torch.empty(3, 6, 2, 3, 3)
        assert torch.ops.metafluence.psg_conv2d(x, g, *geo).shape == (5, 6, 2, 3, 3)
        assert torch.ops.metafluence.psg_conv2d_sqnorm(x, g, *geo).shape == (5,)
        assert torch.ops.metafluence.psg_conv2d_dot(x, g, v, *geo).shape == (5, 3)
    meta = torch.ops.metafluence.psg_conv2d(
        torch.empty(5, 4, 7, 7, device="meta"), torch.empty(5, 6, 7, 7, device="meta"), *geo
    )
    assert meta.shape == (5, 6, 2, 3, 3) and meta.device.type == "meta"


# ---- triton (interpreter on CPU): tiny shapes, few programs ----------------------------------
TRITON_GEOMS = [GEOMS[0], GEOMS[1], GEOMS[3], GEOMS[4], GEOMS[8], (2, 3, 6, 5, 33, 3, 2, 1, 2, 1)]


def _device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", TRITON_GEOMS, ids=[f"t{i}" for i in range(len(TRITON_GEOMS))])
def test_triton_matches_reference(geom, dtype):
    reason = _dispatch.REGISTRY["psg_conv2d"]["triton"](torch.device(_device()), dtype)
    if reason is not None:
        pytest.skip(reason)
    x, g, v, geo = _inputs(geom, dtype, m=2, device=_device())
    _check_all(x, g, v, geo, "triton", dtype)


@pytest.mark.triton
def test_triton_non_contiguous_and_grad():
    dev = torch.device(_device())
    if (reason := _dispatch.REGISTRY["psg_conv2d"]["triton"](dev, torch.float64)) is not None:
        pytest.skip(reason)
    x, g, v, geo = _inputs((2, 2, 5, 5, 3, 3, 1, 1, 1, 1), torch.float64, m=2, device=dev)
    x_nc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    _check_all(x_nc, g, v, geo, "triton", torch.float64)
    mf.psg_conv2d_sqnorm(x_nc, g, *geo, backend="triton").sum().backward()
    x_ref = x.clone().requires_grad_(True)
    ref_sqnorm(x_ref, g, *geo).sum().backward()
    _assert_close(x_nc.grad, x_ref.grad, torch.float64)


# ---- CUDA ----------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", GEOMS + [(300, 3, 12, 12, 64, 3, 1, 1, 1, 1)])
def test_native_cuda_matches_reference(geom, dtype):
    if not NATIVE_CUDA:
        pytest.skip("no native CUDA kernel")
    x, g, v, geo = _inputs(geom, dtype, device="cuda")
    _check_all(x, g, v, geo, "native", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_native_cuda_opcheck_non_contiguous():
    if not NATIVE_CUDA:
        pytest.skip("no native CUDA kernel")
    x, g, v, geo = _inputs((5, 4, 9, 8, 6, 3, 2, 1, 1, 2), torch.float32, device="cuda")
    x_nc = x.contiguous(memory_format=torch.channels_last)
    _check_all(x_nc, g, v, geo, "native", torch.float32)
    args = [list(p) for p in geo[:4]] + [geo[4]]
    torch.library.opcheck(torch.ops.metafluence.psg_conv2d.default, (x_nc, g, *args))
    torch.library.opcheck(torch.ops.metafluence.psg_conv2d_dot.default, (x_nc, g, v, *args))


# ---- dispatch and validation ---------------------------------------------------------------
def test_auto_backend_and_float16_fallback():
    for op in OPS:
        got = _dispatch.select_backend(
            op, _dispatch.REGISTRY[op], torch.device("cpu"), torch.float32
        )
        assert got == ("native" if NATIVE_CPU else "reference")
    x, g, v, geo = _inputs((2, 3, 5, 5, 4, 3, 1, 1, 1, 1), torch.float16)
    assert mf.psg_conv2d(x, g, *geo).dtype == torch.float16
    assert mf.psg_conv2d_dot(x, g, v, *geo).shape == (2, M)


def test_unavailable_backend_lists_every_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, g, _, geo = _inputs((2, 3, 5, 5, 4, 3, 1, 1, 1, 1), torch.float16)
    with pytest.raises(mf.BackendUnavailableError, match="reference: available"):
        mf.psg_conv2d_sqnorm(x, g, *geo, backend="triton")


@pytest.mark.parametrize(
    ("x_shape", "g_shape", "kwargs", "exc", "pattern"),
    [
        ((2, 3, 5), (2, 4, 3, 3), {}, ValueError, r"activations has 3 dims.*\[N, C, H, W\]"),
        ((2, 3, 5, 5), (3, 4, 3, 3), {}, ValueError, r"must agree on N"),
        ((2, 3, 5, 5), (2, 4, 4, 3), {}, ValueError, r"spatial size \[4, 3\], expected \[3, 3\]"),
        ((2, 3, 5, 5), (2, 4, 3, 3), {"groups": 2}, ValueError, r"groups = 2 must divide"),
        ((2, 3, 5, 5), (2, 4, 3, 3), {"padding": -1}, ValueError, r"padding = -1"),
        ((2, 3, 5, 5), (2, 4, 3, 3), {"stride": (1, 1, 1)}, TypeError, r"stride must be"),
        ((2, 3, 5, 5), (2, 4, 3, 3), {"dilation": 0}, ValueError, r"dilation = 0"),
        ((2, 3, 5, 5), (2, 4, 3, 3), {"groups": 0}, ValueError, r"groups = 0"),
        ((2, 3, 5, 5), (2, 4, 5, 5), {"padding": "same"}, TypeError, r"padding='same' is not"),
    ],
)
def test_bad_arguments(x_shape, g_shape, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mf.psg_conv2d(torch.zeros(x_shape), torch.zeros(g_shape), 3, **kwargs)


def test_bad_vectors_and_dtypes():
    x, g = torch.zeros(2, 4, 5, 5), torch.zeros(2, 6, 3, 3)
    with pytest.raises(ValueError, match=r"vectors \[1, 6, 4, 3, 3\] expected \[m, 6, 2, 3, 3\]"):
        mf.psg_conv2d_dot(x, g, torch.zeros(1, 6, 4, 3, 3), 3, groups=2)
    with pytest.raises(ValueError, match="vectors has 4 dims"):
        mf.psg_conv2d_dot(x, g, torch.zeros(6, 4, 3, 3), 3)
    with pytest.raises(TypeError, match="vectors has dtype torch.float64"):
        mf.psg_conv2d_dot(x, g, torch.zeros(1, 6, 4, 3, 3, dtype=torch.float64), 3)
    with pytest.raises(TypeError, match="grad_outputs has dtype torch.int32"):
        mf.psg_conv2d_sqnorm(x, g.int(), 3)


@needs_native
def test_native_op_checks_its_inputs():
    geo = ([3, 3], [1, 1], [0, 0], [1, 1], 1)
    x, g = torch.zeros(2, 4, 5, 5), torch.zeros(2, 6, 3, 3)
    with pytest.raises(RuntimeError, match="spatial size"):
        torch.ops.metafluence.psg_conv2d(x, torch.zeros(2, 6, 4, 4), *geo)
    with pytest.raises(RuntimeError, match="dtype Half not supported"):
        torch.ops.metafluence.psg_conv2d(x.half(), g.half(), *geo)
    with pytest.raises(RuntimeError, match="padding = \\[-1, 0\\]"):
        torch.ops.metafluence.psg_conv2d_sqnorm(x, g, [3, 3], [1, 1], [-1, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="does not divide"):
        torch.ops.metafluence.psg_conv2d(x, g, [3, 3], [1, 1], [0, 0], [1, 1], 3)
    with pytest.raises(RuntimeError, match="expected \\[m, 6, 4, 3, 3\\]"):
        torch.ops.metafluence.psg_conv2d_dot(x, g, torch.zeros(1, 6, 4, 3, 2), *geo)
