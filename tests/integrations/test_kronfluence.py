"""metafluence.integrations.kronfluence vs kronfluence's TrackedLinear (installed --no-deps)."""

import pytest
import torch

pytest.importorskip("kronfluence")
from kronfluence.module.linear import TrackedLinear  # noqa: E402

from metafluence.integrations import kronfluence as mk  # noqa: E402


def _module(bias):
    torch.manual_seed(0)
    return TrackedLinear(name="fc", original_module=torch.nn.Linear(5, 4, bias=bias).double())


def _inputs(tokens):
    g = torch.Generator().manual_seed(1)
    shape = (6, 3) if tokens else (6,)
    a = torch.randn(*shape, 5, generator=g, dtype=torch.float64)
    go = torch.randn(*shape, 4, generator=g, dtype=torch.float64)
    return a, go


@pytest.mark.parametrize("backend", [None, "native", "reference"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens", [True, False])
def test_patched_tracked_linear_equals_kronfluence(bias, tokens, backend):
    m = _module(bias)
    a, go = _inputs(tokens)
    n_in = 6 if bias else 5
    g = torch.Generator().manual_seed(2)
    pg = torch.randn(7, 4, n_in, generator=g, dtype=torch.float64)
    low = [
        torch.randn(7, 4, 2, generator=g, dtype=torch.float64),
        torch.randn(7, 2, n_in, generator=g, dtype=torch.float64),
    ]
    pg_self = torch.randn(6, 4, n_in, generator=g, dtype=torch.float64)

    ref_psg = m.compute_per_sample_gradient(a, go)
    ref_pair = m.compute_pairwise_score(pg, a, go)
    m.einsum_path = None
    ref_low = m.compute_pairwise_score(low, a, go)
    m.einsum_path = None
    ref_self = m.compute_self_measurement_score(pg_self, a, go)
    m.einsum_path = None
    orig = TrackedLinear.compute_pairwise_score
    with mk.use_metafluence_kernels(backend=backend):
        assert TrackedLinear.compute_pairwise_score is not orig
        psg = m.compute_per_sample_gradient(a, go)
        pair = m.compute_pairwise_score(pg, a, go)
        low_s = m.compute_pairwise_score(low, a, go)
        self_s = m.compute_self_measurement_score(pg_self, a, go)
    assert TrackedLinear.compute_pairwise_score is orig
    assert psg.shape == ref_psg.shape == (6, 4, n_in)
    torch.testing.assert_close(psg, ref_psg, rtol=1e-10, atol=1e-10)
    assert pair.shape == ref_pair.shape == (7, 6)
    torch.testing.assert_close(pair, ref_pair, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(low_s, ref_low, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(self_s, ref_self, rtol=1e-10, atol=1e-10)


def test_functions_plain_shapes():
    a, go = _inputs(True)
    G = torch.einsum("bto,bti->boi", go, a)
    torch.testing.assert_close(mk.per_sample_gradient(a, go), G)
    pg = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(mk.pairwise_score(pg, a, go), torch.einsum("qoi,boi->qb", pg, G))
    torch.testing.assert_close(mk.self_score(G, a, go), G.square().sum((1, 2)))


# ---- TrackedConv2d -----------------------------------------------------------------------------
CONVS = [
    dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=True),
    dict(in_channels=2, out_channels=5, kernel_size=(3, 2), stride=(2, 1), dilation=(1, 2)),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", bias=False),
]


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("idx", range(len(CONVS)))
def test_patched_tracked_conv2d_equals_kronfluence(idx, backend):
    from kronfluence.module.conv2d import TrackedConv2d

    torch.manual_seed(idx)
    conv = torch.nn.Conv2d(**CONVS[idx]).double()
    m = TrackedConv2d(name="conv", original_module=conv)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, conv.in_channels, 7, 6, generator=g, dtype=torch.float64)
    go = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
    n_in = conv.weight[0].numel() + (conv.bias is not None)
    pg = torch.randn(5, conv.out_channels, n_in, generator=g, dtype=torch.float64)
    low = [
        torch.randn(5, conv.out_channels, 2, generator=g, dtype=torch.float64),
        torch.randn(5, 2, n_in, generator=g, dtype=torch.float64),
    ]
    pg_self = torch.randn(6, conv.out_channels, n_in, generator=g, dtype=torch.float64)
    refs = []
    for fn, args in (
        (m.compute_per_sample_gradient, (x, go)),
        (m.compute_pairwise_score, (pg, x, go)),
        (m.compute_pairwise_score, (low, x, go)),
        (m.compute_self_measurement_score, (pg_self, x, go)),
    ):
        m.einsum_path = None
        refs.append(fn(*args))
    orig = TrackedConv2d.compute_pairwise_score
    with mk.use_metafluence_kernels(backend=backend):
        assert TrackedConv2d.compute_pairwise_score is not orig
        got = [
            m.compute_per_sample_gradient(x, go),
            m.compute_pairwise_score(pg, x, go),
            m.compute_pairwise_score(low, x, go),
            m.compute_self_measurement_score(pg_self, x, go),
        ]
    assert TrackedConv2d.compute_pairwise_score is orig
    assert got[0].shape == refs[0].shape == (6, conv.out_channels, n_in)
    assert got[1].shape == refs[1].shape == (5, 6)
    for out, ref in zip(got, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", mk.BACKENDS)
@pytest.mark.parametrize("tokens", [True, False])
@pytest.mark.parametrize("queries", [1, 7])
def test_every_backend_of_the_functions(backend, tokens, queries):
    """Each path of pairwise / self scores (full and low-rank P; both contraction orders of the
    einsum path: one query or many, with or without tokens) equals kronfluence's formula."""
    a, go = _inputs(tokens)
    g = torch.Generator().manual_seed(4)
    G = torch.einsum("bto,bti->boi", go.reshape(6, -1, 4), a.reshape(6, -1, 5))
    pg = torch.randn(queries, 4, 5, generator=g, dtype=torch.float64)
    left = torch.randn(queries, 4, 2, generator=g, dtype=torch.float64)
    right = torch.randn(queries, 2, 5, generator=g, dtype=torch.float64)
    psg = mk.per_sample_gradient(a, go, backend=backend)
    torch.testing.assert_close(psg, G, rtol=1e-10, atol=1e-10)
    pair = mk.pairwise_score(pg, a, go, backend=backend)
    torch.testing.assert_close(pair, torch.einsum("qoi,boi->qb", pg, G), rtol=1e-10, atol=1e-10)
    low = mk.pairwise_score([left, right], a, go, backend=backend)
    ref_low = torch.einsum("qoi,boi->qb", left @ right, G)
    torch.testing.assert_close(low, ref_low, rtol=1e-10, atol=1e-10)
    selfs = mk.self_score(G, a, go, backend=backend)
    torch.testing.assert_close(selfs, G.square().sum((1, 2)), rtol=1e-10, atol=1e-10)


def test_default_policy():
    """DEFAULT_BACKEND (from benchmarks/results/kronfluence.csv): the einsum path for linear
    layers, metafluence's native kernels for convolutions; every method is patched."""
    from kronfluence.module.conv2d import TrackedConv2d

    assert {mk.DEFAULT_BACKEND[("linear", f)] for f in mk._METHODS.values()} == {"einsum"}
    assert {mk.DEFAULT_BACKEND[("conv2d", f)] for f in mk._METHODS.values()} == {"native"}
    lin = {n: getattr(TrackedLinear, n) for n in mk._METHODS}
    with mk.use_metafluence_kernels():
        assert all(getattr(TrackedLinear, n) is not lin[n] for n in mk._METHODS)
        assert TrackedConv2d.compute_pairwise_score.__name__ == "conv_pairwise_score"
    assert all(getattr(TrackedLinear, n) is lin[n] for n in mk._METHODS)
    with pytest.raises(ValueError, match="backend"), mk.use_metafluence_kernels(backend="x"):
        pass
    with pytest.raises(ValueError, match="backend"):
        mk.pairwise_score(torch.zeros(1, 4, 5), *_inputs(False), backend="cuda")
