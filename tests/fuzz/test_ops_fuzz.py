"""Property-based tests: every op entry (``metafluence.ops.*`` and the compiled
``torch.ops.metafluence.*``) against its pure-PyTorch twin in :mod:`metafluence.reference`, on
random shapes (N, T, in, out, m, k, P including 0 and odd sizes), float32/float64 and
non-contiguous views; and bad inputs that must raise a ``ValueError`` / ``TypeError`` naming the
argument (the compiled op: a ``RuntimeError`` naming it), never crash.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import metafluence  # noqa: F401  (loads torch.ops.metafluence)
from metafluence import _loader, ops, reference
from metafluence.ops import BackendUnavailableError

from ._strategies import FAST, FEW, assert_close, dtypes, layouts, randn, seeds

PSG_OPS = ("psg_linear", "psg_linear_sqnorm", "psg_linear_dot")
SOLVER_OPS = ("cg_update_", "cg_direction_", "neumann_step_")
NATIVE = all(_loader.has_kernel(op, "cpu") for op in (*PSG_OPS, *SOLVER_OPS))
needs_native = pytest.mark.skipif(not NATIVE, reason=f"no native CPU kernels: {_loader.STATE}")

small = st.integers(0, 7)
pos = st.integers(1, 9)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)


def _pair(n, t, i, o, seed, dtype, layout):
    return randn((n, t, i), seed, dtype, layout), randn((n, t, o), seed + 1, dtype, layout)


def _psg_call(name, a, g, v, backend):
    if name == "psg_linear":
        return ops.psg_linear(a, g, backend=backend)
    if name == "psg_linear_sqnorm":
        return ops.psg_linear_sqnorm(a, g, backend=backend)
    return ops.psg_linear_dot(a, g, v, backend=backend)


def _psg_reference(name, a, g, v):
    fn = getattr(reference, name)
    return fn(a, g) if v is None else fn(a, g, v)


# ---- psg family: native / python entry vs reference ----------------------------------------


@needs_native
@FAST
@given(
    name=st.sampled_from(PSG_OPS),
    n=small,
    t=small,
    i=pos,
    o=pos,
    m=st.integers(0, 4),
    seed=seeds,
    dtype=dtypes,
    layout=layouts,
)
def test_psg_native_matches_reference(name, n, t, i, o, m, seed, dtype, layout):
    a, g = _pair(n, t, i, o, seed, dtype, layout)
    v = randn((m, o, i), seed + 2, dtype, layout) if name == "psg_linear_dot" else None
    ref = _psg_reference(name, a, g, v)
    # float64 reference of the same inputs: the tolerance is relative to the exact value
    ref64 = _psg_reference(name, a.double(), g.double(), None if v is None else v.double())
    out = _psg_call(name, a, g, v, "native")
    assert_close(out, ref, dtype, f"{name} native vs reference")
    assert_close(out.double(), ref64, dtype, f"{name} native vs float64")
    # the compiled op itself (contiguous inputs) and the automatic choice
    raw = getattr(torch.ops.metafluence, name)
    args = (a.contiguous(), g.contiguous()) + (() if v is None else (v.contiguous(),))
    assert_close(raw(*args), ref, dtype, f"torch.ops.metafluence.{name}")
    assert_close(_psg_call(name, a, g, v, None), ref, dtype, f"{name} auto")
    assert_close(_psg_call(name, a, g, v, "reference"), ref, dtype, f"{name} reference entry")


@needs_native
@FEW
@given(name=st.sampled_from(PSG_OPS), n=st.integers(1, 4), seed=seeds)
def test_psg_native_gradients_match_reference(name, n, seed):
    """Backward of the native op equals autograd through the reference (float64)."""
    a, g = _pair(n, 3, 4, 5, seed, torch.float64, "c")
    v = randn((2, 5, 4), seed + 2, torch.float64) if name == "psg_linear_dot" else None
    leaves = [t.clone().requires_grad_(True) for t in (a, g) + (() if v is None else (v,))]
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    w = randn(tuple(_psg_reference(name, a, g, v).shape), seed + 3, torch.float64)
    (_psg_call(name, *leaves, *([None] if v is None else []), "native") * w).sum().backward()
    (_psg_reference(name, *ref_leaves, *([None] if v is None else [])) * w).sum().backward()
    for x, y in zip(leaves, ref_leaves, strict=True):
        assert_close(x.grad, y.grad, torch.float64, f"{name} grad")


@FEW
@given(name=st.sampled_from(PSG_OPS), n=st.integers(0, 3), t=st.integers(0, 3), seed=seeds)
def test_psg_triton_interpreter_matches_reference(name, n, t, seed):
    """The Triton kernels under the CPU interpreter (skipped when Triton is unavailable)."""
    from metafluence.ops import _dispatch

    if _dispatch.triton_check((torch.float32,))(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("triton interpreter unavailable")
    a, g = _pair(n, t, 5, 3, seed, torch.float32, "s")
    v = randn((2, 3, 5), seed + 2, torch.float32) if name == "psg_linear_dot" else None
    out = _psg_call(name, a, g, v, "triton")
    assert_close(out, _psg_reference(name, a, g, v), torch.float32, f"{name} triton")


# ---- fused solver updates: native vs reference ---------------------------------------------------


def _solver_state(k, P, seed, dtype, layout):
    """Rows ``[k, P]`` with curvatures clearly away from the negative-curvature threshold
    (``Ap = c_row · p + small``, ``c_row ∈ {-1, 0.5, 2}``) so both backends take the same
    branch; random active mask, an ``rz_old = 0`` row when ``k > 1``."""
    g = torch.Generator().manual_seed(seed)
    x, r, p, z, b = (randn((k, P), seed + j, dtype, layout) for j in range(5))
    c = torch.tensor([-1.0, 0.5, 2.0], dtype=dtype)[torch.randint(0, 3, (k,), generator=g)]
    Ap = c[:, None] * p + 1e-3 * randn((k, P), seed + 6, dtype)
    vec = {
        "curv_max": torch.rand(k, generator=g, dtype=torch.float64).to(dtype),
        "rz": (torch.rand(k, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        "rz_old": torch.rand(k, generator=g, dtype=torch.float64).to(dtype),
        "thr": (torch.rand(k, generator=g, dtype=torch.float64) * 2 * max(P, 1) ** 0.5).to(dtype),
    }
    if k > 1:
        vec["rz_old"][1] = 0.0
    active = torch.rand(k, generator=g) > 0.3
    return x, r, p, z, b, Ap, vec, active


def _run_solver_ops(impl, state, curv_tol, inv_sigma, advance):
    x, r, p, z, b, Ap, v, act = state
    xs, rs, cm = x.clone(), r.clone(), v["curv_max"].clone()
    if impl == "raw":
        rr, neg = torch.ops.metafluence.cg_update_(xs, rs, cm, p, Ap, v["rz"], act, curv_tol)
    else:
        rr, neg = ops.cg_update_(xs, rs, cm, p, Ap, v["rz"], act, curv_tol, backend=impl)
    ps = p.clone()
    if impl != "raw":
        ops.cg_direction_(ps, z, rr, v["rz_old"], act & ~neg, backend=impl)
    xn, rn_ = x.clone(), r.clone()
    if impl == "raw":
        rn = torch.ops.metafluence.neumann_step_(xn, rn_, b, Ap, act, v["thr"], inv_sigma, advance)
    else:
        rn = ops.neumann_step_(xn, rn_, b, Ap, act, v["thr"], inv_sigma, advance, backend=impl)
    return {
        "rr": rr,
        "neg": neg,
        "x": xs,
        "r": rs,
        "cm": cm,
        "p": ps,
        "nx": xn,
        "nr": rn_,
        "rn": rn,
    }


@needs_native
@FAST
@given(
    k=st.integers(0, 6),
    P=st.integers(0, 40),
    seed=seeds,
    dtype=dtypes,
    layout=layouts,
    curv_tol=st.sampled_from([0.0, 1e-6, 1e-2]),
    inv_sigma=st.floats(0.05, 2.0),
    advance=st.booleans(),
)
def test_solver_updates_native_match_reference(
    k, P, seed, dtype, layout, curv_tol, inv_sigma, advance
):
    state = _solver_state(k, P, seed, dtype, layout)
    ref = _run_solver_ops("reference", state, curv_tol, inv_sigma, advance)
    out = _run_solver_ops("native", state, curv_tol, inv_sigma, advance)
    for key, want in ref.items():
        assert_close(out[key], want, dtype, f"native {key} k={k} P={P}")
    # inactive rows are never written
    inactive = ~state[-1]
    for key, orig in (("x", state[0]), ("r", state[1]), ("p", state[2])):
        assert torch.equal(out[key][inactive], orig[inactive]), f"inactive rows of {key} changed"
    raw = _run_solver_ops("raw", state, curv_tol, inv_sigma, advance)
    for key in ("rr", "neg", "x", "r", "cm", "nx", "nr", "rn"):
        assert_close(raw[key], ref[key], dtype, f"torch.ops.metafluence {key}")


# ---- bad inputs --------------------------------------------------------------------------------

_BAD_PSG = [
    # (description, activations, grad_outputs, vectors, error, argument named in the message)
    ("2-D activations", torch.zeros(2, 3), torch.zeros(2, 1, 4), None, ValueError, "activations"),
    (
        "4-D grad_outputs",
        torch.zeros(2, 1, 3),
        torch.zeros(2, 1, 4, 1),
        None,
        ValueError,
        "grad_outputs",
    ),
    ("N mismatch", torch.zeros(2, 1, 3), torch.zeros(3, 1, 4), None, ValueError, "same N and T"),
    ("T mismatch", torch.zeros(2, 1, 3), torch.zeros(2, 2, 4), None, ValueError, "same N and T"),
    (
        "int activations",
        torch.zeros(2, 1, 3, dtype=torch.int64),
        torch.zeros(2, 1, 4),
        None,
        TypeError,
        "activations has dtype",
    ),
    (
        "dtype mismatch",
        torch.zeros(2, 1, 3),
        torch.zeros(2, 1, 4, dtype=torch.float64),
        None,
        TypeError,
        "grad_outputs has",
    ),
    (
        "device mismatch",
        torch.zeros(2, 1, 3),
        torch.zeros(2, 1, 4, device="meta"),
        None,
        ValueError,
        "grad_outputs is on meta",
    ),
    ("not a tensor", [[[0.0]]], torch.zeros(1, 1, 1), None, TypeError, "activations must be"),
]
_BAD_DOT = [
    ("2-D vectors", torch.zeros(4, 3), ValueError, "vectors has 2 dims"),
    ("vector shape", torch.zeros(1, 3, 4), ValueError, "vectors [1, 3, 4] expected [m, 4, 3]"),
    ("vector dtype", torch.zeros(1, 4, 3, dtype=torch.float64), TypeError, "vectors has dtype"),
    ("vector device", torch.zeros(1, 4, 3, device="meta"), ValueError, "vectors is on meta"),
    ("vector list", [[[0.0]]], TypeError, "vectors must be"),
]


@pytest.mark.parametrize("name", PSG_OPS)
@pytest.mark.parametrize("case", _BAD_PSG, ids=[c[0] for c in _BAD_PSG])
def test_psg_bad_inputs_name_the_argument(name, case):
    _, a, g, _, err, words = case
    v = torch.zeros(1, 4, 3)
    with pytest.raises(err, match=rf"{name}: .*{_re(words)}"):
        _psg_call(name, a, g, v, None)


@pytest.mark.parametrize("case", _BAD_DOT, ids=[c[0] for c in _BAD_DOT])
def test_psg_dot_bad_vectors(case):
    _, v, err, words = case
    with pytest.raises(err, match=_re(words)):
        ops.psg_linear_dot(torch.zeros(2, 1, 3), torch.zeros(2, 1, 4), v)


@pytest.mark.parametrize("backend", ["gpu", "cuda", "", "native "])
def test_backend_strings(backend):
    a, g = torch.zeros(1, 1, 2), torch.zeros(1, 1, 3)
    if backend.strip() in ("", "native"):
        ops.psg_linear(a, g, backend=backend)  # "" = auto; surrounding spaces are accepted
        return
    with pytest.raises(ValueError, match=f"unknown backend '{backend}'"):
        ops.psg_linear(a, g, backend=backend)


def test_backend_env_var_bad(monkeypatch):
    monkeypatch.setenv("METAFLUENCE_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.psg_linear_sqnorm(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3))


def test_unavailable_backend_explains():
    half = torch.zeros(1, 1, 2, dtype=torch.float16), torch.zeros(1, 1, 3, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="dtype float16 not supported"):
        ops.psg_linear(*half, backend="native")


@needs_native
@pytest.mark.parametrize(
    "args, words",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 1, 4)), "activations"),
        ((torch.zeros(2, 1, 3), torch.zeros(3, 1, 4)), "N and T"),
        ((torch.zeros(2, 1, 3), torch.zeros(2, 1, 4, dtype=torch.float64)), "same dtype"),
    ],
)
def test_raw_op_checks(args, words):
    """The compiled op raises (TORCH_CHECK), it does not crash, on inputs the entry rejects."""
    for name in ("psg_linear", "psg_linear_sqnorm"):
        with pytest.raises(RuntimeError, match=words):
            getattr(torch.ops.metafluence, name)(*args)


def _rows(k=3, P=5, dtype=torch.float64):
    return torch.zeros(k, P, dtype=dtype)


def _cg_args(**over):
    args = dict(
        x=_rows(),
        r=_rows(),
        curv_max=torch.zeros(3, dtype=torch.float64),
        p=_rows(),
        Ap=_rows(),
        rz=torch.ones(3, dtype=torch.float64),
        active=torch.ones(3, dtype=torch.bool),
        curv_tol=1e-3,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, err, words",
    [
        ({"x": _rows()[0]}, ValueError, "x has 1 dims"),
        ({"r": _rows(P=4)}, ValueError, "r has shape [3, 4]"),
        ({"Ap": _rows(dtype=torch.float32)}, TypeError, "Ap has dtype"),
        ({"x": _rows().long()}, TypeError, "x has dtype"),
        ({"rz": torch.ones(2, dtype=torch.float64)}, ValueError, "rz has shape [2]"),
        ({"active": torch.ones(3)}, TypeError, "active has dtype"),
        ({"p": _rows().to("meta")}, ValueError, "p is on meta"),
        ({"curv_max": 0.0}, TypeError, "curv_max must be a torch.Tensor"),
    ],
)
def test_cg_update_bad_inputs(over, err, words):
    with pytest.raises(err, match=rf"cg_update_: {_re(words)}"):
        ops.cg_update_(**_cg_args(**over))


def test_neumann_and_direction_bad_inputs():
    x, act = _rows(), torch.ones(3, dtype=torch.bool)
    thr = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"neumann_step_: b has shape \[3, 6\]"):
        ops.neumann_step_(x, x.clone(), _rows(P=6), x, act, thr, 1.0, True)
    with pytest.raises(ValueError, match=r"neumann_step_: thr has shape \[4\]"):
        ops.neumann_step_(x, x.clone(), x, x, act, torch.zeros(4, dtype=torch.float64), 1.0, True)
    with pytest.raises(ValueError, match=r"cg_direction_: z has shape"):
        ops.cg_direction_(x, _rows(k=2), thr, thr, act)
    with pytest.raises(ValueError, match=r"cg_direction_: active has shape \[2\]"):
        ops.cg_direction_(x, x, thr, thr, act[:2])


def _re(s: str) -> str:
    import re

    return re.escape(s)
