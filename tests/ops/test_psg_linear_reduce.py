"""psg_linear_sqnorm / psg_linear_dot: every backend against the reference, validation, opcheck,
fake kernels, autograd."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests._close import assert_close_maxnorm

import metafluence as mf
from metafluence import _loader
from metafluence.ops import _dispatch
from metafluence.reference import psg_linear_dot as ref_dot
from metafluence.reference import psg_linear_sqnorm as ref_sqnorm

DTYPES = [torch.float64, torch.float32]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _assert_close(out, ref, dtype, what=""):
    assert_close_maxnorm(out, ref, RTOL[dtype], what)


HAS_CUDA = torch.cuda.is_available()
OPS = ("psg_linear_sqnorm", "psg_linear_dot")
NATIVE_CPU = all(_loader.has_kernel(op, "cpu") for op in OPS)
NATIVE_CUDA = all(_loader.has_kernel(op, "cuda") for op in OPS)
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason=f"no native CPU kernel: {_loader.STATE}")
M = 3


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)


def _inputs(n, t, i, o, dtype, m=M, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, i, generator=gen, dtype=dtype).to(device)
    g = torch.randn(n, t, o, generator=gen, dtype=dtype).to(device)
    v = torch.randn(m, o, i, generator=gen, dtype=dtype).to(device)
    return a, g, v


def _check_both(a, g, v, backend, dtype):
    _assert_close(mf.psg_linear_sqnorm(a, g, backend=backend), ref_sqnorm(a, g), dtype)
    _assert_close(mf.psg_linear_dot(a, g, v, backend=backend), ref_dot(a, g, v), dtype)


# T in {1, 5, 40}: (in, out) = (3, 5) with T = 40 uses the row-tiled form in C++,
# (33, 65) with T = 1 or 5 the Gram form, so both forms of the C++ kernel are covered.
GRID = list(itertools.product([0, 1, 7, 97], [1, 5], [(3, 5), (33, 65), (1, 1)]))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "io"), GRID + [(7, 40, (3, 5)), (5, 40, (33, 65))])
def test_native_cpu_matches_reference(n, t, io, dtype):
    a, g, v = _inputs(n, t, io[0], io[1], dtype)
    _check_both(a, g, v, "native", dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_non_contiguous_and_edges(dtype):
    a, g, v = _inputs(7, 5, 9, 11, dtype)
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)
    g_nc = torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]
    v_nc = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (a_nc.is_contiguous() or g_nc.is_contiguous() or v_nc.is_contiguous())
    _check_both(a_nc, g_nc, v_nc, "native", dtype)
    _assert_close(torch.ops.metafluence.psg_linear_dot(a_nc, g_nc, v_nc), ref_dot(a, g, v), dtype)
    # T = 0, m = 0, in = 0
    a0, g0, v0 = _inputs(4, 0, 3, 2, dtype)
    assert torch.equal(mf.psg_linear_sqnorm(a0, g0, backend="native"), torch.zeros(4, dtype=dtype))
    assert torch.equal(
        mf.psg_linear_dot(a0, g0, v0, backend="native"), torch.zeros(4, M, dtype=dtype)
    )
    a1, g1, _ = _inputs(4, 2, 3, 2, dtype)
    assert mf.psg_linear_dot(a1, g1, torch.zeros(0, 2, 3, dtype=dtype)).shape == (4, 0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    for n, t, i, o in [(7, 5, 3, 4), (0, 1, 3, 2), (1, 1, 1, 1)]:
        a, g, v = _inputs(n, t, i, o, dtype)
        for req in (False, True):
            a.requires_grad_(req)
            g.requires_grad_(req)
            v.requires_grad_(req)
            torch.library.opcheck(torch.ops.metafluence.psg_linear_sqnorm.default, (a, g))
            torch.library.opcheck(torch.ops.metafluence.psg_linear_dot.default, (a, g, v))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck(backend):
    if backend == "native" and not NATIVE_CPU:
        pytest.skip("no native CPU kernel")
    a, g, v = _inputs(3, 2, 4, 5, torch.float64, m=2)
    for x in (a, g, v):
        x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, y: mf.psg_linear_sqnorm(x, y, backend=backend), (a, g)
    )
    assert torch.autograd.gradcheck(
        lambda x, y, z: mf.psg_linear_dot(x, y, z, backend=backend), (a, g, v)
    )


@needs_native
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, g, v = torch.empty(5, 3, 7), torch.empty(5, 3, 2), torch.empty(4, 2, 7)
        assert torch.ops.metafluence.psg_linear_sqnorm(a, g).shape == (5,)
        assert torch.ops.metafluence.psg_linear_dot(a, g, v).shape == (5, 4)
    meta = torch.ops.metafluence.psg_linear_dot(
        torch.empty(5, 3, 7, device="meta"),
        torch.empty(5, 3, 2, device="meta"),
        torch.empty(4, 2, 7, device="meta"),
    )
    assert meta.shape == (5, 4) and meta.device.type == "meta"


# ---- triton (interpreter on CPU): few programs, large tiles ------------------------------------
TRITON_GRID = [(0, 1, 3, 3), (1, 1, 1, 1), (7, 5, 3, 5), (3, 17, 65, 3), (97, 1, 3, 3)]


def _device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "i", "o"), TRITON_GRID)
def test_triton_matches_reference(n, t, i, o, dtype):
    reason = _dispatch.REGISTRY["psg_linear_dot"]["triton"](torch.device(_device()), dtype)
    if reason is not None:
        pytest.skip(reason)
    a, g, v = _inputs(n, t, i, o, dtype, m=2, device=_device())
    _check_both(a, g, v, "triton", dtype)


@pytest.mark.triton
def test_triton_non_contiguous_and_grad():
    dev = torch.device(_device())
    if (
        reason := _dispatch.REGISTRY["psg_linear_sqnorm"]["triton"](dev, torch.float64)
    ) is not None:
        pytest.skip(reason)
    a, g, v = _inputs(4, 3, 5, 6, torch.float64, m=2, device=dev)
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    g_nc = torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]
    _check_both(a_nc, g_nc, v, "triton", torch.float64)
    mf.psg_linear_sqnorm(a_nc, g_nc, backend="triton").sum().backward()
    a_ref = a.clone().requires_grad_(True)
    ref_sqnorm(a_ref, g).sum().backward()
    _assert_close(a_nc.grad, a_ref.grad, torch.float64)


# ---- CUDA --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("n", "t", "io"), GRID + [(3, 40, (130, 33)), (70000, 2, (3, 2)), (4, 0, (3, 2))]
)
def test_native_cuda_matches_reference(n, t, io, dtype):
    if not NATIVE_CUDA:
        pytest.skip("no native CUDA kernel")
    a, g, v = _inputs(n, t, io[0], io[1], dtype, device="cuda")
    _check_both(a, g, v, "native", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_native_cuda_opcheck_non_contiguous():
    if not NATIVE_CUDA:
        pytest.skip("no native CUDA kernel")
    a, g, v = _inputs(7, 5, 6, 10, torch.float32, device="cuda")
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)
    _check_both(a_nc, g, v, "native", torch.float32)
    torch.library.opcheck(torch.ops.metafluence.psg_linear_sqnorm.default, (a_nc, g))
    torch.library.opcheck(torch.ops.metafluence.psg_linear_dot.default, (a_nc, g, v))


# ---- dispatch and validation ---------------------------------------------------------------------
def test_auto_backend_and_float16_fallback():
    for op in OPS:
        checks = _dispatch.REGISTRY[op]
        got = _dispatch.select_backend(op, checks, torch.device("cpu"), torch.float32)
        # psg_linear_dot: the reference first on CPU (its native kernel lost at kronfluence's
        # shapes, benchmarks/results/kronfluence.csv); psg_linear_sqnorm: native when built
        first = "reference" if op == "psg_linear_dot" else "native"
        assert got == (first if NATIVE_CPU else "reference")
    a, g, v = _inputs(2, 3, 4, 5, torch.float16)
    assert mf.psg_linear_sqnorm(a, g).dtype == torch.float16
    assert mf.psg_linear_dot(a, g, v).shape == (2, M)


def test_unavailable_backend_lists_every_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, g, v = _inputs(2, 3, 4, 5, torch.float16)
    with pytest.raises(mf.BackendUnavailableError, match="reference: available"):
        mf.psg_linear_dot(a, g, v, backend="triton")


@pytest.mark.parametrize(
    ("a_shape", "g_shape", "v_shape", "exc", "pattern"),
    [
        ((2, 3), (2, 3, 4), (1, 4, 3), ValueError, r"activations has 2 dims.*\[N, T, in\]"),
        ((2, 3, 4), (2, 5, 4), (1, 4, 4), ValueError, r"same N and T"),
        ((2, 3, 4), (2, 3, 5), (1, 4, 5), ValueError, r"vectors \[1, 4, 5\] expected \[m, 5, 4\]"),
        ((2, 3, 4), (2, 3, 5), (5, 4), ValueError, r"vectors has 2 dims"),
    ],
)
def test_bad_shapes(a_shape, g_shape, v_shape, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mf.psg_linear_dot(torch.zeros(a_shape), torch.zeros(g_shape), torch.zeros(v_shape))


def test_bad_dtypes():
    a, g = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)
    with pytest.raises(TypeError, match="grad_outputs has dtype torch.int32"):
        mf.psg_linear_sqnorm(a, g.int())
    with pytest.raises(TypeError, match="vectors has dtype torch.float64"):
        mf.psg_linear_dot(a, g, torch.zeros(1, 5, 4, dtype=torch.float64))


@needs_native
def test_native_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="must agree on N and T"):
        torch.ops.metafluence.psg_linear_sqnorm(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))
    with pytest.raises(RuntimeError, match="expected \\[m, 4, 4\\]"):
        torch.ops.metafluence.psg_linear_dot(
            torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(1, 4, 3)
        )
