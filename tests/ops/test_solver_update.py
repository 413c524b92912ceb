"""Fused solver updates (cg_update_, cg_direction_, neumann_step_): every backend against the
reference on odd sizes, empty batches, non-contiguous inputs, float32/float64; opcheck; fakes."""

from __future__ import annotations

import pytest
import torch
from tests._close import assert_close_maxnorm

from metafluence import _loader
from metafluence.ops import _dispatch, solver_update

DTYPES = [torch.float64, torch.float32]
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _close(out, ref, dtype, what=""):
    assert_close_maxnorm(out, ref, RTOL[dtype], what)


HAS_CUDA = torch.cuda.is_available()
OPS = ("cg_update_", "cg_direction_", "neumann_step_")
NATIVE_CPU = all(_loader.has_kernel(op, "cpu") for op in OPS)
NATIVE_CUDA = all(_loader.has_kernel(op, "cuda") for op in OPS)
ROWS = [0, 1, 7, 97]
PS = [1, 37, 16385 + 2]  # odd, > one CPU chunk (16384)

needs_native = pytest.mark.skipif(not NATIVE_CPU, reason=f"no native CPU kernel: {_loader.STATE}")


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)


def _state(k, P, dtype, device="cpu", seed=0, noncontig=False):
    """CG-like state: Ap = d ⊙ p with d mostly positive (a few rows with negative curvature)."""
    g = torch.Generator().manual_seed(seed)

    def rows():
        t = torch.randn(k, P, generator=g, dtype=dtype)
        if noncontig:  # same values, column-major strides
            t = t.t().contiguous().t()
        return t.to(device)

    x, r, p, z = rows(), rows(), rows(), rows()
    d = torch.rand(k, P, generator=g, dtype=dtype) + 0.1
    if k > 2:
        d[2] = -d[2]  # negative curvature row
    Ap = (d.to(device) * p).contiguous()
    vec = {
        "curv_max": (torch.rand(k, generator=g, dtype=dtype) * 0.5).to(device),
        "rz": (torch.rand(k, generator=g, dtype=dtype) + 0.5).to(device),
        "rz_old": torch.rand(k, generator=g, dtype=dtype).to(device),
        "thr": (torch.rand(k, generator=g, dtype=dtype) * 2 * P**0.5).to(device),
    }
    if k > 3:
        vec["rz_old"][3] = 0.0
    active = (torch.rand(k, generator=g) > 0.25).to(device)
    return x, r, p, z, Ap, vec, active


def _run_all(backend, k, P, dtype, device="cpu", noncontig=False):
    """Run the three ops on `backend` and the reference from the same state; compare."""
    x, r, p, z, Ap, v, act = _state(k, P, dtype, device, noncontig=noncontig)
    outs = {}
    for impl in (backend, "reference"):
        xs, rs, cm = x.clone(), r.clone(), v["curv_max"].clone()  # clone keeps the strides
        assert xs.is_contiguous() != noncontig
        rr, neg = solver_update.cg_update_(xs, rs, cm, p, Ap, v["rz"], act, 1e-2, backend=impl)
        ps = p.clone()
        solver_update.cg_direction_(ps, z, rr, v["rz_old"], act & ~neg, backend=impl)
        res = {"x": xs, "r": rs, "curv_max": cm, "rr": rr, "neg": neg, "p": ps}
        for adv in (False, True):
            xn, rn_ = x.clone(), r.clone()
            rn = solver_update.neumann_step_(xn, rn_, z, Ap, act, v["thr"], 0.37, adv, backend=impl)
            res.update({f"nx{adv}": xn, f"nr{adv}": rn_, f"rn{adv}": rn})
        outs[impl] = res
    for key, ref in outs["reference"].items():
        _close(outs[backend][key].cpu(), ref.cpu(), dtype, f"{backend} {key} k={k} P={P}")
    return outs


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", ROWS)
@pytest.mark.parametrize("P", PS)
def test_native_cpu_matches_reference(k, P, dtype):
    outs = _run_all("native", k, P, dtype)
    if k > 2:  # the state exercises every branch
        neg = outs["reference"]["neg"]
        assert bool(neg[2]) or not bool(_state(k, P, dtype)[6][2])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_cpu_non_contiguous(dtype):
    _run_all("native", 7, 37, dtype, noncontig=True)


@needs_native
def test_native_p_zero():
    _run_all("native", 5, 0, torch.float64)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    for k, P in [(7, 37), (0, 5), (1, 1)]:
        x, r, p, z, Ap, v, act = _state(k, P, dtype)
        torch.library.opcheck(
            torch.ops.metafluence.cg_update_.default,
            (x, r, v["curv_max"], p, Ap, v["rz"], act, 1e-3),
        )
        torch.library.opcheck(
            torch.ops.metafluence.cg_direction_.default, (p, z, v["rz"], v["rz_old"], act)
        )
        torch.library.opcheck(
            torch.ops.metafluence.neumann_step_.default, (x, r, z, Ap, act, v["thr"], 0.5, True)
        )


@needs_native
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 7)
        vec = torch.empty(5)
        act = torch.empty(5, dtype=torch.bool)
        rr, neg = torch.ops.metafluence.cg_update_(x, x.clone(), vec, x, x, vec, act, 1e-3)
        rn = torch.ops.metafluence.neumann_step_(x, x.clone(), x, x, act, vec, 0.5, True)
    assert rr.shape == (5,) and neg.dtype == torch.bool and rn.shape == (5,)


@needs_native
def test_native_op_checks_its_inputs():
    x = torch.zeros(3, 4)
    v = torch.zeros(3)
    act = torch.ones(3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="Ap has shape"):
        torch.ops.metafluence.cg_update_(x, x.clone(), v, x, torch.zeros(3, 5), v, act, 1e-3)
    with pytest.raises(RuntimeError, match="active has dtype"):
        torch.ops.metafluence.cg_direction_(x, x, v, v, v)


def test_validation_messages():
    x = torch.zeros(3, 4)
    v = torch.zeros(3)
    act = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"cg_update_: Ap has shape \[3, 5\]"):
        solver_update.cg_update_(x, x.clone(), v, x, torch.zeros(3, 5), v, act, 1e-3)
    with pytest.raises(ValueError, match=r"thr has shape \[2\], expected \[3\]"):
        solver_update.neumann_step_(x, x.clone(), x, x, act, torch.zeros(2), 0.5, True)
    with pytest.raises(TypeError, match="active has dtype"):
        solver_update.cg_direction_(x, x, v, v, v)
    with pytest.raises(TypeError, match="same dtype"):
        solver_update.cg_direction_(x, x.double(), v, v, act)


def test_auto_backend_on_cpu():
    want = "native" if NATIVE_CPU else "reference"
    assert solver_update.fused_backend(torch.device("cpu"), torch.float32) == want
    assert solver_update.fused_backend(torch.device("cpu"), torch.float16) == "reference"
    with pytest.raises(_dispatch.BackendUnavailableError, match="native: rejected"):
        solver_update.fused_backend(torch.device("cpu"), torch.float16, backend="native")


# ---- triton (interpreter on CPU) ------------------------------------------------------------
def _device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "P"), [(0, 5), (1, 1), (7, 37), (5, 1500)])
def test_triton_matches_reference(k, P, dtype):
    if why := solver_update.CHECKS["cg_update_"]["triton"](torch.device(_device()), dtype):
        pytest.skip(why)
    _run_all("triton", k, P, dtype, device=_device())


@pytest.mark.triton
def test_triton_non_contiguous():
    if why := solver_update.CHECKS["cg_update_"]["triton"](torch.device(_device()), torch.float64):
        pytest.skip(why)
    _run_all("triton", 7, 37, torch.float64, device=_device(), noncontig=True)


# ---- CUDA -------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and NATIVE_CUDA), reason="no CUDA GPU / native CUDA kernel")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "P"), [(k, P) for k in ROWS for P in PS] + [(70000, 3)])
def test_native_cuda_matches_reference(k, P, dtype):
    _run_all("native", k, P, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not (HAS_CUDA and NATIVE_CUDA), reason="no CUDA GPU / native CUDA kernel")
def test_native_cuda_non_contiguous_opcheck():
    _run_all("native", 7, 37, torch.float32, device="cuda", noncontig=True)
    x, r, p, z, Ap, v, act = _state(7, 37, torch.float32, "cuda")
    torch.library.opcheck(
        torch.ops.metafluence.cg_update_.default, (x, r, v["curv_max"], p, Ap, v["rz"], act, 1e-3)
    )


@pytest.mark.parametrize("backend", ["reference", None])
def test_loop_forms_match_in_place_ops(backend):
    """cg_update / cg_direction (what solve_cg calls) give the in-place ops' values (the
    reference's exactly, an automatic backend's to rounding); the reference form leaves its
    inputs untouched and lets a gradient through."""

    def same(got, want):
        if backend == "reference" or want.dtype == torch.bool:
            assert torch.equal(got, want)
        else:
            _close(got, want, torch.float64)

    x, r, p, z, Ap, v, act = _state(7, 37, torch.float64)
    xs, rs, cm = x.clone(), r.clone(), v["curv_max"].clone()
    rr, neg = solver_update.cg_update_(xs, rs, cm, p, Ap, v["rz"], act, 1e-2, backend="reference")
    x2, r2, cm2 = x.clone(), r.clone(), v["curv_max"].clone()
    out = solver_update.cg_update(x2, r2, cm2, p, Ap, v["rz"], act, 1e-2, backend=backend)
    for got, want in zip(out, (xs, rs, cm, rr, neg), strict=True):
        same(got, want)
    if backend == "reference":
        assert torch.equal(x2, x) and torch.equal(r2, r)  # out of place
    ps = p.clone()
    solver_update.cg_direction_(ps, z, rr, v["rz_old"], act & ~neg, backend="reference")
    p2 = p.clone()
    same(solver_update.cg_direction(p2, z, rr, v["rz_old"], act & ~neg, backend=backend), ps)
    pg = p.clone().requires_grad_(True)  # a gradient forces the reference form
    xg = solver_update.cg_update(x.clone(), r.clone(), cm2.clone(), pg, Ap, v["rz"], act, 1e-2)[0]
    (grad,) = torch.autograd.grad(xg.sum(), pg)
    assert torch.isfinite(grad).all()
