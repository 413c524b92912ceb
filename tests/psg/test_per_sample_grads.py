"""mf.per_sample_grads / per_sample_grad_dots / per_sample_grad_norms / psg.logit_jacobians
against torch.func (vmap(grad), or the loss-vector Jacobian for batch-statistics BatchNorm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import metafluence as mf
from metafluence.psg import registry
from tests._close import assert_close_maxnorm

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _close(out, ref, dtype, what=""):
    assert_close_maxnorm(out, ref, RTOL[dtype], what)


def _ref_psg(model, params, x, y, loss_fn, exact=False):
    p = {k: v.detach() for k, v in params.items()}
    if exact:  # rows of the Jacobian of the loss vector (batch statistics couple samples)
        bufs = {k: b.clone() for k, b in model.named_buffers()}

        def losses(q):
            b = {k: v.clone() for k, v in bufs.items()}
            return loss_fn(functional_call(model, {**q, **b}, (x,)), y)

        return jacrev(losses)(p)

    def one(q, xi, yi):
        return loss_fn(functional_call(model, q, (xi[None],)), yi[None]).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(p, x, y)


def _ce(logits, y):
    return nn.functional.cross_entropy(logits, y, reduction="none")


def _mse(pred, y):
    return ((pred - y) ** 2).reshape(pred.shape[0], -1).sum(1)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.ln = nn.LayerNorm(6)
        self.lin = nn.Linear(6, 5)  # input [N, T, 6]: extra dims
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        h = self.lin(self.ln(self.emb(idx)))
        return self.head(torch.tanh(h).mean(1))


class Scaled(nn.Module):  # no rule: per-module torch.func fallback
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.scale


class Shared(nn.Module):
    """A module called twice (its per-sample gradients add over the calls), one whose output
    never reaches the loss (zero gradients) and in-place ops on captured outputs."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.mid = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 2)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x).relu_()
        h = self.mid(torch.tanh(self.mid(h)))
        self.unused(h)
        return self.head(self.norm(h).mul_(2.0))


def _conv_model(norm: str, c_in=1, filters=8, blocks=2, size=12, classes=5):
    layers: list[nn.Module] = []
    c = c_in
    for _ in range(blocks):
        layers.append(nn.Conv2d(c, filters, 3, padding=1))
        layers.append(nn.BatchNorm2d(filters) if norm == "bn" else nn.GroupNorm(2, filters))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c = filters
    side = size // 2**blocks
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(filters * side * side, classes))


def _conv_variants():
    return [
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True),
        nn.Conv2d(4, 6, (3, 2), stride=1, padding=(2, 0), dilation=2, groups=2),
        nn.Conv2d(3, 5, 2, stride=(2, 1), padding=0),  # unequal strides
        nn.Conv2d(3, 3, 3, padding="same", padding_mode="reflect", groups=3),
        nn.Conv2d(3, 4, 1, bias=False),
        nn.Conv2d(3, 6, (2, 4), padding="same", groups=3),  # asymmetric 'same', 2 per group
        nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular"),
    ]


def _model_cases():
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3)), (7,), "ce"),
        "conv_gn": (lambda: _conv_model("gn"), (1, 12, 12), "ce"),
        "conv_bn_eval": (lambda: _conv_model("bn").eval(), (1, 12, 12), "ce"),
        "tokens": (Tokens, None, "ce"),
        "fallback": (
            lambda: nn.Sequential(nn.Linear(4, 5), Scaled(5), nn.Linear(5, 2)),
            (4,),
            "mse",
        ),
        "bn1d_eval": (
            lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval(),
            (4,),
            "ce",
        ),
        "shared": (Shared, (4,), "ce"),
        "inplace_relu": (
            lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)),
            (4,),
            "ce",
        ),
    }


def _data(name, shape, loss, n, dtype, out_dim, gen):
    if name == "tokens":
        x = torch.randint(0, 11, (n, 4), generator=gen)
        x[:, 0] = 0  # padding_idx rows
        x[:, 1] = x[:, 2]  # repeated index within a sample
    else:
        x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    if loss == "ce":
        y = torch.randint(0, out_dim, (n,), generator=gen)
    else:
        y = torch.randn(n, out_dim, generator=gen, dtype=dtype)
    return x, y


def _setup(name, n, dtype, seed=0):
    torch.manual_seed(seed)
    make, shape, loss = _model_cases()[name]
    model = make().to(dtype)
    for mod in model.modules():  # non-trivial running statistics / affine parameters
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
        if isinstance(mod, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            nn.init.normal_(mod.weight)
            nn.init.normal_(mod.bias)
    out_dim = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = _data(name, shape, loss, n, dtype, out_dim, gen)
    params = dict(model.named_parameters())
    return model, params, x, y, loss, _ce if loss == "ce" else _mse


CASES = list(_model_cases())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("name", CASES)
def test_per_sample_grads_match_func(name, n, dtype):
    model, params, x, y, loss, loss_fn = _setup(name, n, dtype)
    got = mf.per_sample_grads(model, params, x, y, loss="cross_entropy" if loss == "ce" else "mse")
    assert set(got) == set(params)
    if n == 0:
        assert all(g.shape == (0, *params[k].shape) for k, g in got.items())
        return
    ref = _ref_psg(model, params, x, y, loss_fn)
    for k in params:
        _close(got[k], ref[k], dtype, k)


@pytest.mark.parametrize("name", ["conv_gn", "tokens", "mlp", "shared", "fallback", "bn1d_eval"])
def test_dots_and_norms_match_materialised(name):
    dtype = torch.float64
    model, params, x, y, loss, loss_fn = _setup(name, 7, dtype)
    spec = "cross_entropy" if loss == "ce" else "mse"
    g = mf.per_sample_grads(model, params, x, y, loss=spec, method="func")
    flat = torch.cat([g[k].reshape(7, -1) for k in params], 1)
    gen = torch.Generator().manual_seed(3)
    vectors = {k: torch.randn(3, *p.shape, generator=gen, dtype=dtype) for k, p in params.items()}
    vflat = torch.cat([vectors[k].reshape(3, -1) for k in params], 1)
    _close(mf.per_sample_grad_norms(model, params, x, y, loss=spec), flat.pow(2).sum(1), dtype)
    _close(mf.per_sample_grad_dots(model, params, x, y, vectors, loss=spec), flat @ vflat.T, dtype)
    # non-contiguous vectors and inputs
    vnc = {k: v.transpose(0, -1).contiguous().transpose(0, -1) for k, v in vectors.items()}
    _close(mf.per_sample_grad_dots(model, params, x, y, vnc, loss=spec), flat @ vflat.T, dtype)


def test_non_contiguous_input_and_subset_of_params():
    dtype = torch.float64
    model, params, x, y, _, loss_fn = _setup("conv_gn", 5, dtype)
    x_nc = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_nc.is_contiguous()
    sub = {k: v for k, v in params.items() if not k.endswith("bias")}
    got = mf.per_sample_grads(model, sub, x_nc, y)
    ref = _ref_psg(model, sub, x, y, loss_fn)
    assert set(got) == set(sub)
    for k in sub:
        _close(got[k], ref[k], dtype, k)
    norms = mf.per_sample_grad_norms(model, sub, x_nc, y)
    _close(norms, sum(ref[k].reshape(5, -1).pow(2).sum(1) for k in sub), dtype)


@pytest.mark.parametrize("idx", range(len(_conv_variants())))
def test_conv2d_variants(idx):
    dtype = torch.float64
    torch.manual_seed(idx)
    conv = _conv_variants()[idx].to(dtype)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3).to(dtype))
    x = torch.randn(5, conv.in_channels, 9, 8, dtype=dtype)
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())
    got = mf.per_sample_grads(model, params, x, y)
    ref = _ref_psg(model, params, x, y, _ce)
    for k in params:
        _close(got[k], ref[k], dtype, k)
    flat = torch.cat([ref[k].reshape(5, -1) for k in params], 1)
    _close(mf.per_sample_grad_norms(model, params, x, y), flat.pow(2).sum(1), dtype)
    vectors = {k: torch.randn(3, *p.shape, dtype=dtype) for k, p in params.items()}
    vflat = torch.cat([vectors[k].reshape(3, -1) for k in params], 1)
    _close(mf.per_sample_grad_dots(model, params, x, y, vectors), flat @ vflat.T, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_batchnorm_batch_statistics_exact(dtype):
    """Training-mode BatchNorm: G_n = row n of d[ℓ_1..ℓ_N]/dθ (cross-sample terms included)."""
    model, params, x, y, _, loss_fn = _setup("conv_bn_eval", 7, dtype)
    model.train()
    before = {k: b.clone() for k, b in model.named_buffers()}
    assert mf.psg.uses_batch_statistics(model)
    got = mf.per_sample_grads(model, params, x, y)
    ref = _ref_psg(model, params, x, y, loss_fn, exact=True)
    for k in params:
        _close(got[k], ref[k], dtype, k)
    # the rows sum to the ordinary batch gradient, and differ from vmap(grad) (own-batch BN)
    bufs = {k: b.clone() for k, b in model.named_buffers()}
    logits = functional_call(model, {**params, **bufs}, (x,))
    total = torch.autograd.grad(loss_fn(logits, y).sum(), list(params.values()))
    for k, t in zip(params, total, strict=True):
        _close(got[k].sum(0), t, dtype, k)
    flat = torch.cat([got[k].reshape(7, -1) for k in params], 1)
    _close(mf.per_sample_grad_norms(model, params, x, y), flat.pow(2).sum(1), dtype)
    vectors = {k: torch.ones(2, *p.shape, dtype=dtype) for k, p in params.items()}
    _close(
        mf.per_sample_grad_dots(model, params, x, y, vectors),
        flat.sum(1, keepdim=True).expand(7, 2),
        dtype,
    )
    for k, b in model.named_buffers():  # running statistics untouched
        assert torch.equal(b, before[k]), k
    with pytest.raises(ValueError, match="batch statistics"):
        mf.per_sample_grads(model, params, x, y, method="hooks")


def test_conv4_model_on_28x28():
    """The benchmark architecture, small N: Conv-4 (64 filters) + Linear head on 1x28x28."""
    dtype = torch.float32
    torch.manual_seed(0)
    model = _conv_model("gn", filters=64, blocks=4, size=28).to(dtype)
    x = torch.randn(3, 1, 28, 28, dtype=dtype)
    y = torch.randint(0, 5, (3,))
    params = dict(model.named_parameters())
    got = mf.per_sample_grads(model, params, x, y)
    ref = _ref_psg(model, params, x, y, _ce)
    for k in params:
        _close(got[k], ref[k], dtype, k)
    flat = torch.cat([ref[k].reshape(3, -1) for k in params], 1)
    _close(mf.per_sample_grad_norms(model, params, x, y), flat.pow(2).sum(1), dtype)


@pytest.mark.parametrize("name", ["mlp", "conv_gn", "shared"])
def test_logit_jacobians(name):
    dtype = torch.float64
    model, params, x, _, _, _ = _setup(name, 5, dtype)
    p = {k: v.detach() for k, v in params.items()}
    ref = vmap(jacrev(lambda q, xi: functional_call(model, q, (xi[None],))[0]), in_dims=(None, 0))(
        p, x
    )
    got = mf.psg.logit_jacobians(model, params, x)
    func = mf.psg.logit_jacobians(model, params, x, method="func")
    for k in params:
        _close(got[k], ref[k], dtype, k)
        _close(func[k], ref[k], dtype, k)
    flat = mf.psg.logit_jacobians(model, params, x, flat=True)
    assert flat.shape == (
        5,
        ref[next(iter(params))].shape[1],
        sum(v.numel() for v in params.values()),
    )


def test_registry_and_errors():
    assert registry.get_rule(nn.Linear(2, 3)) is not None
    assert registry.get_rule(Scaled(2)) is None
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(KeyError, match="not a parameter"):
        mf.per_sample_grads(model, {"nope": torch.zeros(1)}, x, y)
    with pytest.raises(ValueError, match="expected \\[m, 2, 3\\]"):
        mf.per_sample_grad_dots(
            model, params, x, y, {"weight": torch.zeros(2, 3), "bias": torch.zeros(1, 2)}
        )
    with pytest.raises(ValueError, match="loss="):
        mf.per_sample_grads(model, params, x, y, loss="hinge")
    custom = mf.per_sample_grads(model, params, x, y, loss=lambda lg, t: lg.pow(2).sum(1))
    assert custom["weight"].shape == (4, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_group_norm_rule_fused_equals_recomputed(dtype):
    """GroupNorm: the fused path (group statistics kept from the forward) equals recomputing x̂."""
    from metafluence.psg.registry import Call, get_rule

    torch.manual_seed(0)
    gn = nn.GroupNorm(3, 6).to(dtype)
    x = torch.randn(5, 6, 4, 3, dtype=dtype) * 3 + 1
    g = torch.randn(5, 6, 4, 3, dtype=dtype)
    rule = get_rule(gn)
    fused = Call(args=(x,), kwargs={}, output=gn(x), grad_output=g)
    rule.on_forward(gn, fused)
    assert "group_stats" in fused.extras
    plain = Call(args=(x,), kwargs={}, output=fused.output.detach(), grad_output=g)
    rule.on_forward(gn, plain)
    assert "group_stats" not in plain.extras
    got = rule.grads(gn, fused, ["weight", "bias"])
    ref = rule.grads(gn, plain, ["weight", "bias"])
    xhat = nn.functional.group_norm(x, 3, eps=gn.eps)
    _close(ref["weight"], (g * xhat).sum((2, 3)), dtype)
    for k in ("weight", "bias"):
        _close(got[k], ref[k], dtype, k)


class TupleOut(nn.Module):  # a parametrised module whose output the hooks path cannot capture
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return x @ self.weight.T, None


class UsesTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TupleOut()

    def forward(self, x):
        return self.inner(x)[0]


@pytest.mark.parametrize("entry", ["grads", "norms", "dots"])
def test_hooks_path_probes_with_its_own_forward(entry):
    """The hooks path checks that x and y fit on its own batched forward: one forward per call
    (no 1-sample probe), and the same errors as the probe of the other paths."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = dict(model.named_parameters())
    vectors = {k: torch.randn(2, *v.shape) for k, v in params.items()}

    def run(x, y, **kw):
        if entry == "grads":
            return mf.per_sample_grads(model, params, x, y, **kw)
        if entry == "norms":
            return mf.per_sample_grad_norms(model, params, x, y, **kw)
        return mf.per_sample_grad_dots(model, params, x, y, vectors, **kw)

    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    batches = []
    handle = model[0].register_forward_hook(lambda m, a, o: batches.append(a[0].shape[0]))
    run(x, y)
    assert batches == [5]
    run(x, y, method="func")  # the func path keeps its 1-sample probe
    assert batches[1] == 1
    handle.remove()
    for method in ("hooks", "func"):
        with pytest.raises(ValueError, match=r"x of shape \(5, 4\) .* does not fit the model"):
            run(torch.randn(5, 4), y, method=method)
        with pytest.raises(ValueError, match=r"y has label 2 outside \[0, 2\)"):
            run(x, torch.full((5,), 2), method=method)
        with pytest.raises(ValueError, match=r"y of shape \(5, 1\) .* does not fit loss="):
            run(x, y[:, None], method=method)
        with pytest.raises(ValueError, match=r"loss='mse' needs targets shaped like"):
            run(x, torch.randn(5), loss="mse", method=method)
    # an output the hooks path cannot capture is its own error, not "x does not fit"
    odd = UsesTuple()
    p_odd = dict(odd.named_parameters())
    with pytest.raises(TypeError, match="capture needs a tensor output"):
        mf.per_sample_grads(odd, p_odd, x, y)


def test_hooks_path_leaves_no_graph_behind_after_an_error():
    """A call that fails after the capturing forward (bad labels, bad input) drops the graph:
    the taps hold consumers that hold the calls, a cycle through autograd nodes that the garbage
    collector cannot break."""
    import gc

    model = nn.Sequential(nn.Linear(3, 97), nn.Tanh(), nn.Linear(97, 2))
    params = dict(model.named_parameters())
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))

    def alive():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor and o.shape == (5, 97))

    before = alive()
    bad = [(x, torch.full((5,), 2)), (x, torch.randn(5)), (torch.randn(5, 4), y)]  # labels, x
    for bad_x, bad_y in bad:
        for entry in (mf.per_sample_grads, mf.per_sample_grad_norms):
            with pytest.raises(ValueError):
                entry(model, params, bad_x, bad_y)
    assert alive() == before
