"""torch.compile(fullgraph=True) of the public native ops (CPU, inductor)."""

import pytest
import torch

import metafluence.ops as ops
from metafluence.reference import psg as ref_psg
from metafluence.reference import psg_reduce as ref_reduce

if not hasattr(torch.ops.metafluence, "psg_linear"):
    pytest.skip("native extension not built", allow_module_level=True)


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


def test_native_ops_backward_compile_fullgraph_aot_eager():
    """Forward + backward traced by AOTAutograd in one graph (autograd formulas trace)."""
    _check_backward("aot_eager")


@pytest.mark.slow
def test_native_ops_backward_compile_fullgraph_inductor():
    """Forward + backward through inductor (about 25 s on a cold cache here)."""
    _check_backward("inductor")


@pytest.mark.parametrize("backend", [None, "native"])
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
