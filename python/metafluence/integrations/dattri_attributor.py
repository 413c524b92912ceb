"""A dattri attributor backed by metafluence: ``IFAttributorMetafluence``.

Usable wherever dattri's ``IFAttributorCG`` is::

    from dattri.task import AttributionTask
    from metafluence.integrations.dattri_attributor import IFAttributorMetafluence

    attributor = IFAttributorMetafluence(task, regularization=1e-3, max_iter=100, tol=1e-7)
    attributor.cache(full_train_loader)
    scores = attributor.attribute(train_loader, test_loader)  # [n_train, n_test]

Unlike dattri 0.3.0's ``IFAttributorCG`` / ``IFAttributorExplicit``, which add up one inverse per
batch of ``full_train_loader`` (``Σ_b H_b⁻¹ g``, dattri PR #241), ``transform_test_rep`` inverts
the Hessian of the **whole** training set once (:func:`~metafluence.integrations.dattri.
ihvp_dataset_cg`), with every test gradient a column of one batched CG solve stopping at ``tol``.
With a single-batch ``full_train_loader`` (dattri's recommended setting) both agree.

Requires dattri (``pip install dattri``); importing this module without it raises
``ModuleNotFoundError`` with that hint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

try:
    from dattri.algorithm.base import BaseInnerProductAttributor
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without dattri
    raise ModuleNotFoundError(
        "metafluence.integrations.dattri_attributor needs dattri: pip install dattri==0.3.0"
    ) from exc

from .dattri import ihvp_dataset_cg

__all__ = ["IFAttributorMetafluence"]


class _OnDevice:
    """Re-iterable view of a loader with every tensor of a batch moved to ``device``."""

    def __init__(self, loader: Any, device: Any):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for batch in self.loader:
            if isinstance(batch, torch.Tensor):
                batch = (batch,)
            yield tuple(t.to(self.device) if isinstance(t, torch.Tensor) else t for t in batch)


class IFAttributorMetafluence(BaseInnerProductAttributor):
    """Influence functions with one CG inverse of the whole-training-set Hessian.

    Args:
        task: a ``dattri.task.AttributionTask``.
        layer_name: parameters to attribute through (as in dattri; ``None`` = all).
        device: where the computation runs.
        max_iter: maximum CG iterations; tol: absolute residual per test column.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        regularization: ``λ`` in ``(H + λI)⁻¹``.
        reduction: how batch losses of ``full_train_loader`` combine into the dataset loss:
            ``"mean"`` (batch-size-weighted average: the task's loss is a batch mean) or
            ``"sum"`` (the task's loss is a batch sum).
    """

    def __init__(
        self,
        task: Any,
        layer_name: str | list[str] | None = None,
        device: str | None = "cpu",
        max_iter: int = 100,
        tol: float = 1e-7,
        mode: str = "rev-rev",
        regularization: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(task, layer_name, device)
        self.transformation_kwargs = {
            "max_iter": max_iter,
            "tol": tol,
            "mode": mode,
            "regularization": regularization,
            "reduction": reduction,
        }
        self.last_result = None

    def transform_test_rep(self, ckpt_idx: int, test_rep: torch.Tensor) -> torch.Tensor:
        """``(H_D + λI)⁻¹ test_rep`` for ``test_rep`` ``[batch, P]`` (one batched solve)."""
        model_params, _ = self.task.get_param(ckpt_idx, layer_name=self.layer_name)
        loss = self.task.get_loss_func(layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        key = self.task.loss_func_data_key

        def func(params: torch.Tensor, *batch: Any) -> torch.Tensor:
            return loss(params, **{key: tuple(batch)})

        res = ihvp_dataset_cg(
            func,
            model_params,
            _OnDevice(self.full_train_dataloader, self.device),
            test_rep,
            return_result=True,
            **self.transformation_kwargs,
        )
        self.last_result = res
        return res.x.detach()
