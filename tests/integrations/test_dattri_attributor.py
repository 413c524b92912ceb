"""IFAttributorMetafluence inside dattri's attribute() vs dattri's IFAttributorExplicit."""

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("dattri")
from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorExplicit  # noqa: E402
from dattri.task import AttributionTask  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from metafluence.integrations.dattri_attributor import IFAttributorMetafluence  # noqa: E402
from tests._close import assert_close_normwise  # noqa: E402

N, D, C, REG = 40, 4, 3, 1e-2
N_TEST = 6


def _task(model, checkpoints):
    def loss_func(params, data_target_pair):
        xb, yb = data_target_pair
        logits = torch.func.functional_call(model, params, (xb,))
        return nn.functional.cross_entropy(logits, yb)

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.randn(N + N_TEST, D)
    y = torch.randint(0, C, (N + N_TEST,))
    model = nn.Linear(D, C)
    model.eval()
    task = _task(model, model.state_dict())
    train = TensorDataset(x[:N], y[:N])
    test = TensorDataset(x[N:], y[N:])
    return task, train, test


def _scores(attributor, train, test, full_batch, **kwargs):
    attributor.cache(DataLoader(train, batch_size=full_batch))
    return attributor.attribute(
        DataLoader(train, batch_size=8), DataLoader(test, batch_size=3), **kwargs
    )


def test_matches_explicit_single_batch(setup):
    task, train, test = setup
    ref = _scores(IFAttributorExplicit(task, regularization=REG), train, test, N)
    ours_attr = IFAttributorMetafluence(task, regularization=REG, max_iter=100, tol=1e-5)
    ours = _scores(ours_attr, train, test, N)
    assert ours.shape == ref.shape == (N, N_TEST)  # dattri's [n_train, n_test]
    assert_close_normwise(ours, ref, rtol=1e-3)
    assert ours_attr.last_result.converged


def test_multi_batch_cache_is_one_dataset_inverse(setup):
    """With a 4-batch full_train_loader we still invert the full-data Hessian (= the single-batch
    explicit answer); dattri's own attributors add per-batch inverses instead."""
    task, train, test = setup
    ref = _scores(IFAttributorExplicit(task, regularization=REG), train, test, N)
    ours = _scores(IFAttributorMetafluence(task, regularization=REG, tol=1e-5), train, test, 10)
    assert_close_normwise(ours, ref, rtol=1e-3)
    summed = _scores(IFAttributorCG(task, regularization=REG, max_iter=50), train, test, 10)
    assert not torch.allclose(summed, ref, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("method", ["l", "theta"])
def test_relatif_matches_explicit(setup, method):
    """RelatIF (dattri's relatif_method) is honoured: same normalisation as dattri's own."""
    task, train, test = setup
    ref = _scores(
        IFAttributorExplicit(task, regularization=REG), train, test, N, relatif_method=method
    )
    plain = _scores(IFAttributorMetafluence(task, regularization=REG), train, test, N)
    ours = _scores(
        IFAttributorMetafluence(task, regularization=REG), train, test, N, relatif_method=method
    )
    assert ours.shape == (N, N_TEST)
    assert_close_normwise(ours, ref, rtol=1e-3)
    assert not torch.allclose(ours, plain)


def test_float32_default_tol_converges(setup):
    """dattri's default tol=1e-7 in float32: the relative rule (floored at √eps) converges well
    before max_iter instead of always running to it."""
    task, train, test = setup
    attr = IFAttributorMetafluence(task, regularization=REG, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _scores(attr, train, test, N)
    res = attr.last_result
    assert res.x.dtype == torch.float32
    assert res.converged and res.iters < 200
    assert float(res.residual.max()) <= 3.5e-4


def test_unconverged_solve_warns(setup):
    task, train, test = setup
    attr = IFAttributorMetafluence(task, regularization=REG, max_iter=1, tol=1e-12)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        _scores(attr, train, test, N)
    assert not attr.last_result.converged


def test_one_solve_per_checkpoint(setup, monkeypatch):
    """attribute() solves once for all test points (dattri's loop re-solves for every pair of
    train and test batches)."""
    task, train, test = setup
    attr = IFAttributorMetafluence(task, regularization=REG)
    calls = []
    orig = attr.transform_test_rep
    monkeypatch.setattr(
        attr, "transform_test_rep", lambda ck, rep: calls.append(rep.shape) or orig(ck, rep)
    )
    _scores(attr, train, test, N)
    assert calls == [torch.Size([N_TEST, D * C + C])]


def test_self_attribute_and_checkpoints(setup):
    """self_attribute and several checkpoints (scores averaged over them) as dattri's."""
    _, train, test = setup
    torch.manual_seed(1)
    model = nn.Linear(D, C)
    model.eval()
    # clones: dattri loads each checkpoint into the model in place
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = [state, {k: v + 0.1 * torch.randn_like(v) for k, v in state.items()}]
    task = _task(model, ckpts)
    ref = _scores(IFAttributorExplicit(task, regularization=REG), train, test, N)
    ours = _scores(IFAttributorMetafluence(task, regularization=REG), train, test, N)
    assert_close_normwise(ours, ref, rtol=1e-3)
    # dattri 0.3.0's own self_attribute fails on batched loaders: compare with the diagonal
    ex = IFAttributorExplicit(task, regularization=REG)
    ex.cache(DataLoader(train, batch_size=N))
    ref_self = ex.attribute(DataLoader(train, batch_size=8), DataLoader(train, batch_size=8))
    attr = IFAttributorMetafluence(task, regularization=REG)
    attr.cache(DataLoader(train, batch_size=N))
    ours_self = attr.self_attribute(DataLoader(train, batch_size=8))
    ref_self = ref_self.diagonal()
    assert ours_self.shape == (N,)
    assert_close_normwise(ours_self, ref_self, rtol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "err", "name"),
    [
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"max_iter": 2.5}, TypeError, "max_iter"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"regularization": -1e-3}, ValueError, "regularization"),
        ({"mode": "fwd-fwd"}, ValueError, "mode"),
        ({"reduction": "max"}, ValueError, "reduction"),
        ({"layer_name": 3}, TypeError, "layer_name"),
    ],
)
def test_bad_options_are_named(setup, kwargs, err, name):
    task, _, _ = setup
    with pytest.raises(err, match=name):
        IFAttributorMetafluence(task, **kwargs)


def test_bad_relatif_method_is_named(setup):
    task, train, test = setup
    attr = IFAttributorMetafluence(task, regularization=REG)
    attr.cache(DataLoader(train, batch_size=N))
    for call in (
        lambda: attr.attribute(DataLoader(train), DataLoader(test), relatif_method="L2"),
        lambda: attr.self_attribute(DataLoader(train), relatif_method="norm"),
    ):
        with pytest.raises(ValueError, match="relatif_method"):
            call()
