"""psg_linear: every backend against the reference, validation, opcheck, autograd."""

from __future__ import annotations

import itertools

import pytest
import torch
from tests._close import assert_close_maxnorm

import metafluence as mf
from metafluence import _loader
from metafluence.ops import _dispatch
from metafluence.reference import psg_linear as reference

CHECKS = _dispatch.REGISTRY["psg_linear"]
DTYPES = [torch.float64, torch.float32]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _assert_close(out, ref, dtype, what=""):
    assert_close_maxnorm(out, ref, RTOL[dtype], what)


HAS_CUDA = torch.cuda.is_available()
NATIVE_CPU = _loader.has_kernel("psg_linear", "cpu")
NATIVE_CUDA = _loader.has_kernel("psg_linear", "cuda")

needs_native = pytest.mark.skipif(not NATIVE_CPU, reason=f"no native CPU kernel: {_loader.STATE}")
needs_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU"),
]


def _inputs(n, t, i, o, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, i, generator=gen, dtype=dtype).to(device)
    g = torch.randn(n, t, o, generator=gen, dtype=dtype).to(device)
    return a, g


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    """Tests choose backends explicitly: a METAFLUENCE_BACKEND from the shell must not leak."""
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)


FULL_GRID = list(itertools.product([0, 1, 7, 97], [1, 5], [1, 3, 64], [1, 3, 64]))


# ---- native (C++ CPU) ------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "i", "o"), FULL_GRID)
def test_native_cpu_matches_reference(n, t, i, o, dtype):
    a, g = _inputs(n, t, i, o, dtype)
    out = mf.psg_linear(a, g, backend="native")
    _assert_close(out, reference(a, g), dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_non_contiguous(dtype):
    a, g = _inputs(7, 5, 6, 10, dtype)
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)  # same values, permuted strides
    g_nc = torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]  # strided last dim
    assert not a_nc.is_contiguous() and not g_nc.is_contiguous()
    out = mf.psg_linear(a_nc, g_nc, backend="native")
    _assert_close(out, reference(a, g[:, :, :]), dtype)
    # the raw op also accepts non-contiguous input
    _assert_close(torch.ops.metafluence.psg_linear(a_nc, g_nc), reference(a, g), dtype)


@needs_native
def test_native_cpu_empty_t_and_dims():
    a, g = _inputs(4, 0, 3, 2, torch.float64)
    assert torch.equal(mf.psg_linear(a, g, backend="native"), torch.zeros(4, 2, 3, dtype=a.dtype))
    a, g = _inputs(4, 2, 0, 2, torch.float64)
    assert mf.psg_linear(a, g, backend="native").shape == (4, 2, 0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    for n, t, i, o in [(7, 5, 3, 4), (0, 1, 3, 2), (1, 1, 1, 1)]:
        a, g = _inputs(n, t, i, o, dtype)
        torch.library.opcheck(torch.ops.metafluence.psg_linear.default, (a, g))
        a.requires_grad_(True)
        g.requires_grad_(True)
        torch.library.opcheck(torch.ops.metafluence.psg_linear.default, (a, g))
    a, g = _inputs(7, 5, 6, 10, dtype)
    torch.library.opcheck(
        torch.ops.metafluence.psg_linear.default,
        (a.transpose(1, 2).contiguous().transpose(1, 2), g),
    )


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck(backend):
    if backend == "native" and not NATIVE_CPU:
        pytest.skip("no native CPU kernel")
    a, g = _inputs(3, 2, 4, 5, torch.float64)
    a.requires_grad_(True)
    g.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: mf.psg_linear(x, y, backend=backend), (a, g))


@needs_native
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(5, 3, 7)
        g = torch.empty(5, 3, 2)
        out = torch.ops.metafluence.psg_linear(a, g)
    assert out.shape == (5, 2, 7)
    out = torch.ops.metafluence.psg_linear(
        torch.empty(5, 3, 7, device="meta"), torch.empty(5, 3, 2, device="meta")
    )
    assert out.shape == (5, 2, 7) and out.device.type == "meta"


# ---- triton (interpreter on CPU) --------------------------------------------------------------
TRITON_GRID = [
    (0, 1, 3, 3),
    (1, 1, 1, 1),
    (7, 5, 3, 64),
    (7, 5, 64, 3),
    (3, 17, 65, 1),  # T > BLOCK_T, in > BLOCK_I: several tiles and T chunks
    (97, 1, 3, 3),
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "i", "o"), TRITON_GRID)
def test_triton_matches_reference(n, t, i, o, dtype):
    reason = CHECKS["triton"](torch.device(_device()), dtype)
    if reason is not None:
        pytest.skip(reason)
    a, g = _inputs(n, t, i, o, dtype, device=_device())
    out = mf.psg_linear(a, g, backend="triton")
    _assert_close(out, reference(a, g), dtype)


@pytest.mark.triton
def test_triton_non_contiguous_and_grad():
    dev = torch.device(_device())
    if (reason := CHECKS["triton"](dev, torch.float64)) is not None:
        pytest.skip(reason)
    a, g = _inputs(4, 3, 5, 6, torch.float64, device=dev)
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    g_nc = torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]
    out = mf.psg_linear(a_nc, g_nc, backend="triton")
    _assert_close(out, reference(a, g), torch.float64)
    out.sum().backward()
    a_ref = a.clone().requires_grad_(True)
    reference(a_ref, g).sum().backward()
    _assert_close(a_nc.grad, a_ref.grad, torch.float64)


def _device():
    return "cuda" if HAS_CUDA else "cpu"


# ---- CUDA (native kernel) ---------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "t", "i", "o"), FULL_GRID + [(3, 40, 70, 33), (70000, 2, 3, 2)])
def test_native_cuda_matches_reference(n, t, i, o, dtype):
    if not NATIVE_CUDA:
        pytest.skip(f"no native CUDA kernel: {CHECKS['native'](torch.device('cuda'), dtype)}")
    a, g = _inputs(n, t, i, o, dtype, device="cuda")
    out = mf.psg_linear(a, g, backend="native")
    _assert_close(out, reference(a, g), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_native_cuda_opcheck_non_contiguous():
    if not NATIVE_CUDA:
        pytest.skip("no native CUDA kernel")
    a, g = _inputs(7, 5, 6, 10, torch.float32, device="cuda")
    a_nc = a.transpose(0, 1).contiguous().transpose(0, 1)
    _assert_close(mf.psg_linear(a_nc, g, backend="native"), reference(a, g), torch.float32)
    torch.library.opcheck(torch.ops.metafluence.psg_linear.default, (a_nc, g))


# ---- dispatch ---------------------------------------------------------------------------------
def test_auto_backend_on_cpu():
    # the native CPU kernel lost to the reference in benchmarks/results/psg_linear.csv: auto
    # prefers the reference on CPU (ops/psg_linear.py); backend="native" still forces it
    expected = "reference"
    dev = torch.device("cpu")
    assert _dispatch.select_backend("psg_linear", CHECKS, dev, torch.float32) == expected
    # no fast kernel for float16: auto falls back to the reference
    got = _dispatch.select_backend("psg_linear", CHECKS, dev, torch.float16)
    assert got == "reference"
    a, g = _inputs(2, 3, 4, 5, torch.float16)
    assert mf.psg_linear(a, g).dtype == torch.float16


@pytest.mark.parametrize("spelling", ["torch", "reference", "TORCH"])
def test_reference_alias(spelling, monkeypatch):
    monkeypatch.setenv("METAFLUENCE_BACKEND", spelling)
    dev = torch.device("cpu")
    assert _dispatch.select_backend("psg_linear", CHECKS, dev, torch.float32) == "reference"
    a, g = _inputs(3, 2, 4, 5, torch.float64)
    _assert_close(mf.psg_linear(a, g), reference(a, g), torch.float64)


def test_kwarg_overrides_env(monkeypatch):
    monkeypatch.setenv("METAFLUENCE_BACKEND", "native")
    dev = torch.device("cpu")
    got = _dispatch.select_backend("psg_linear", CHECKS, dev, torch.float16, backend="reference")
    assert got == "reference"


def test_unknown_backend():
    a, g = _inputs(2, 3, 4, 5, torch.float64)
    with pytest.raises(ValueError, match="unknown backend"):
        mf.psg_linear(a, g, backend="cublas")


def test_unavailable_backend_lists_every_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, g = _inputs(2, 3, 4, 5, torch.float16)
    with pytest.raises(mf.BackendUnavailableError) as info:
        mf.psg_linear(a, g, backend="triton")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for name in ("native", "triton", "reference"):
        assert f"{name}:" in msg
    assert "float16" in msg
    assert "reference: available" in msg
    with pytest.raises(mf.BackendUnavailableError, match="native: rejected"):
        mf.psg_linear(a, g, backend="native")


# ---- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a_shape", "g_shape", "exc", "pattern"),
    [
        ((2, 3), (2, 3, 4), ValueError, r"activations has 2 dims.*\[N, T, in\]"),
        ((2, 3, 4), (2, 3, 4, 1), ValueError, r"grad_outputs has 4 dims.*\[N, T, out\]"),
        ((2, 3, 4), (3, 3, 4), ValueError, r"activations.*\[N, T, in\].*grad_outputs"),
        ((2, 3, 4), (2, 5, 4), ValueError, r"same N and T"),
    ],
)
def test_bad_shapes(a_shape, g_shape, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mf.psg_linear(torch.zeros(a_shape), torch.zeros(g_shape))


def test_bad_dtypes_and_types():
    a = torch.zeros(2, 3, 4)
    with pytest.raises(TypeError, match="activations has dtype torch.int64"):
        mf.psg_linear(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match="grad_outputs has dtype torch.int32"):
        mf.psg_linear(a, torch.zeros(2, 3, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="same dtype"):
        mf.psg_linear(a, torch.zeros(2, 3, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="activations must be a torch.Tensor"):
        mf.psg_linear([[1.0]], torch.zeros(2, 3, 5))  # type: ignore[arg-type]


def test_different_devices():
    a = torch.zeros(2, 3, 4)
    g = torch.zeros(2, 3, 5, device="meta")
    with pytest.raises(ValueError, match="activations is on cpu but grad_outputs is on meta"):
        mf.psg_linear(a, g)


@needs_native
def test_native_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="activations has 2 dims"):
        torch.ops.metafluence.psg_linear(torch.zeros(2, 3), torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="must agree on N and T"):
        torch.ops.metafluence.psg_linear(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))
