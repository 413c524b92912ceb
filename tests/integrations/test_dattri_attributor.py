"""IFAttributorMetafluence inside dattri's attribute() vs dattri's IFAttributorExplicit."""

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


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x = torch.randn(N + 6, D)
    y = torch.randint(0, C, (N + 6,))
    model = nn.Linear(D, C)
    model.eval()

    def loss_func(params, data_target_pair):
        xb, yb = data_target_pair
        logits = torch.func.functional_call(model, params, (xb,))
        return nn.functional.cross_entropy(logits, yb)

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    train = TensorDataset(x[:N], y[:N])
    test = TensorDataset(x[N:], y[N:])
    return task, train, test


def _scores(attributor, train, test, full_batch):
    attributor.cache(DataLoader(train, batch_size=full_batch))
    return attributor.attribute(DataLoader(train, batch_size=8), DataLoader(test, batch_size=3))


def test_matches_explicit_single_batch(setup):
    task, train, test = setup
    ref = _scores(IFAttributorExplicit(task, regularization=REG), train, test, N)
    ours_attr = IFAttributorMetafluence(task, regularization=REG, max_iter=100, tol=1e-5)
    ours = _scores(ours_attr, train, test, N)
    assert ours.shape == ref.shape == (N, 6)
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
