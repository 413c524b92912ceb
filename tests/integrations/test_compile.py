"""torch.compile(fullgraph=True) of the public native ops (CPU, inductor) and of the public
per-sample-gradient entries (``per_sample_grads``, ``per_sample_grad_dots``,
``per_sample_grad_norms``)."""

import pytest
import torch
from torch import nn

import metafluence as mf
import metafluence.ops as ops
from metafluence.reference import psg as ref_psg
from metafluence.reference import psg_reduce as ref_reduce
from tests._close import assert_close_normwise

native = pytest.mark.skipif(
    not hasattr(torch.ops.metafluence, "psg_linear"), reason="native extension not built"
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    go = torch.randn(4, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    return a, go, v


def _torch_ops(a, go, v):
    m = torch.ops.metafluence
    return m.psg_linear(a, go), m.psg_linear_sqnorm(a, go), m.psg_linear_dot(a, go, v)


def _reference(a, go, v):
    return (
        ref_psg.psg_linear(a, go),
        ref_reduce.psg_linear_sqnorm(a, go),
        ref_reduce.psg_linear_dot(a, go, v),
    )


@native
def test_native_ops_compile_fullgraph_inductor():
    """Forward through inductor (about 3-8 s here on a cold cache)."""
    torch._dynamo.reset()
    a, go, v = _inputs()
    with torch.no_grad():
        out = torch.compile(_torch_ops, fullgraph=True, backend="inductor")(a, go, v)
        ref = _reference(a, go, v)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


def _check_backward(backend):
    torch._dynamo.reset()
    a, go, v = _inputs()

    def loss_fn(a, go, v):
        out = _torch_ops(a, go, v)
        return out[0].square().sum() + out[1].sum() + out[2].square().sum()

    loss = torch.compile(loss_fn, fullgraph=True, backend=backend)(a, go, v)
    ga, ggo = torch.autograd.grad(loss, (a, go))
    ref = _reference(a, go, v)
    rloss = ref[0].square().sum() + ref[1].sum() + ref[2].square().sum()
    ra, rgo = torch.autograd.grad(rloss, (a, go))
    torch.testing.assert_close(loss, rloss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, ra, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ggo, rgo, rtol=1e-10, atol=1e-10)


@native
def test_native_ops_backward_compile_fullgraph_aot_eager():
    """Forward + backward traced by AOTAutograd in one graph (autograd formulas trace)."""
    _check_backward("aot_eager")


@native
@pytest.mark.slow
def test_native_ops_backward_compile_fullgraph_inductor():
    """Forward + backward through inductor (about 25 s on a cold cache here)."""
    _check_backward("inductor")


@pytest.mark.parametrize("backend", [None, pytest.param("native", marks=native)])
def test_python_entries_compile_fullgraph(backend):
    """The public entries trace without graph breaks (reference twin, or native if asked)."""
    torch._dynamo.reset()
    a, go, v = _inputs()

    def f(a, go, v):
        return (
            ops.psg_linear(a, go, backend=backend),
            ops.psg_linear_sqnorm(a, go, backend=backend),
            ops.psg_linear_dot(a, go, v, backend=backend),
        )

    with torch.no_grad():
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(a, go, v)
    for o, r in zip(out, _reference(a, go, v), strict=True):
        torch.testing.assert_close(o, r.detach(), rtol=1e-10, atol=1e-12)


# ---- per-sample-gradient entries ---------------------------------------------------------------


def _linear_problem(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 3).to(dtype)
    params = dict(model.named_parameters())
    x = torch.randn(7, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (7,), generator=g)
    vectors = {k: torch.randn(2, *v.shape, generator=g, dtype=dtype) for k, v in params.items()}
    return model, params, x, y, vectors


ENTRIES = {
    "per_sample_grads": lambda m, p, x, y, v: mf.per_sample_grads(m, p, x, y),
    "per_sample_grad_dots": lambda m, p, x, y, v: mf.per_sample_grad_dots(m, p, x, y, v),
    "per_sample_grad_norms": lambda m, p, x, y, v: mf.per_sample_grad_norms(m, p, x, y),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_psg_entries_compile_fullgraph(entry, dtype):
    """Each public per-sample-gradient entry traces as one graph on an nn.Linear (the value
    checks on labels run eagerly only) and gives the eager result."""
    torch._dynamo.reset()
    model, params, x, y, vectors = _linear_problem(dtype)
    fn = ENTRIES[entry]
    eager = fn(model, params, x, y, vectors)
    compiled = torch.compile(
        lambda x, y: fn(model, params, x, y, vectors), fullgraph=True, backend="aot_eager"
    )(x, y)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close_normwise(compiled, eager, rtol, entry)


def test_psg_value_checks_still_run_eagerly():
    """The eager error messages are unchanged by the tracing guard."""
    model, params, x, y, vectors = _linear_problem(torch.float64)
    bad = y.clone()
    bad[2] = -1
    for fn in ENTRIES.values():
        with pytest.raises(ValueError, match=r"^y has label -1 < 0$"):
            fn(model, params, x, bad, vectors)
    bad[2] = 3
    with pytest.raises(ValueError, match=r"y has label 3 outside \[0, 3\) \(the model has 3"):
        mf.per_sample_grad_norms(model, params, x, bad)
