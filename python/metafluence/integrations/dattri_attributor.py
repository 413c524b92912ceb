"""A dattri attributor backed by metafluence: ``IFAttributorMetafluence``.

Usable wherever dattri's ``IFAttributorCG`` is::

    from dattri.task import AttributionTask
    from metafluence.integrations.dattri_attributor import IFAttributorMetafluence

    attributor = IFAttributorMetafluence(task, regularization=1e-3, max_iter=100, tol=1e-7)
    attributor.cache(full_train_loader)
    scores = attributor.attribute(train_loader, test_loader)  # [n_train, n_test]
    scores = attributor.attribute(train_loader, test_loader, relatif_method="l")  # RelatIF
    self_scores = attributor.self_attribute(train_loader)  # [n_train]

Scores are dattri's: ``score[i, j] = g_iᵀ (H_D + λI)⁻¹ g_j`` with ``g_i`` the gradient of train
point ``i``'s loss, ``g_j`` that of test point ``j`` (dattri's test target) and ``H_D`` the Hessian
of the loss over ``full_train_loader``; averaged over the task's checkpoints, as dattri does.

Unlike dattri 0.3.0's ``IFAttributorCG`` / ``IFAttributorExplicit``, which add up one inverse per
batch of ``full_train_loader`` (``Σ_b H_b⁻¹ g``, dattri PR #241), the Hessian of the **whole**
training set is inverted (:func:`~metafluence.integrations.dattri.ihvp_dataset_cg`), and
:meth:`~IFAttributorMetafluence.attribute` does it **once per checkpoint**: every test gradient
is a column of one batched CG solve (dattri's loop re-solves for every pair of train and test
batches). With a single-batch ``full_train_loader`` (dattri's recommended setting) the scores
agree with ``IFAttributorExplicit``.

Requires dattri (``pip install dattri``); importing this module without it raises
``ModuleNotFoundError`` with that hint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

try:
    from dattri.algorithm.base import BaseInnerProductAttributor
    from dattri.algorithm.utils import _check_shuffle
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without dattri
    raise ModuleNotFoundError(
        "metafluence.integrations.dattri_attributor needs dattri: pip install dattri==0.3.0"
    ) from exc

from .._checks import check_float, check_int
from ..solvers import SolveResult
from ..solvers._base import default_rtol
from .dattri import _MODES, ihvp_dataset_cg

__all__ = ["RELATIF_METHODS", "IFAttributorMetafluence"]

#: dattri's ``relatif_method`` values (``None``: no normalisation)
RELATIF_METHODS = (None, "l", "theta")


class _OnDevice:
    """Re-iterable view of a loader with every tensor of a batch moved to ``device``."""

    def __init__(self, loader: Any, device: Any):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        for batch in self.loader:
            if isinstance(batch, Tensor):
                batch = (batch,)
            yield tuple(t.to(self.device) if isinstance(t, Tensor) else t for t in batch)


def _check_relatif(relatif_method: Any) -> str | None:
    if relatif_method not in RELATIF_METHODS:
        raise ValueError(
            f"relatif_method={relatif_method!r}: expected one of {RELATIF_METHODS} "
            "('l': divide by sqrt(g_iᵀ H⁻¹ g_i), 'theta': by ‖H⁻¹ g_i‖, None: no normalisation)"
        )
    return relatif_method


class IFAttributorMetafluence(BaseInnerProductAttributor):
    """Influence functions with one CG inverse of the whole-training-set Hessian.

    ``score[i, j] = g_iᵀ (H_D + λI)⁻¹ g_j`` (``[n_train, n_test]``, dattri's sign and shape).

    Args:
        task: a ``dattri.task.AttributionTask``.
        layer_name: parameters to attribute through (as in dattri; ``None`` = all).
        device: where the computation runs.
        max_iter: maximum CG iterations (``>= 1``).
        tol: **relative** residual per column: column ``j`` stops when
            ``‖b_j − (H_D + λI) x_j‖ ≤ max(tol, √eps) · ‖b_j‖``, with ``√eps`` of the
            parameters' dtype (3.5e-4 in float32, 1.5e-8 in float64) as a floor: a float32
            residual stagnates near ``eps · cond`` and would otherwise never report
            convergence. dattri's ``tol`` is absolute (its CG stops at ``‖r‖ < tol``), which
            makes the stopping rule depend on the scale of the gradients.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        regularization: ``λ ≥ 0`` in ``(H + λI)⁻¹``.
        reduction: how batch losses of ``full_train_loader`` combine into the dataset loss:
            ``"mean"`` (batch-size-weighted average: the task's loss is a batch mean) or
            ``"sum"`` (the task's loss is a batch sum).

    Every option is validated here (ValueError / TypeError naming it). ``last_result`` holds the
    :class:`~metafluence.solvers.SolveResult` of the latest solve (``converged``, per-column
    ``residual``); a solve that stops at ``max_iter`` warns (``RuntimeWarning``).
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
        max_iter = check_int(max_iter, "max_iter", minimum=1)
        tol = check_float(tol, "tol", minimum=0.0)
        regularization = check_float(regularization, "regularization", minimum=0.0)
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r}: expected one of {_MODES}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'sum'")
        if layer_name is not None and not (
            isinstance(layer_name, str)
            or (isinstance(layer_name, list) and all(isinstance(n, str) for n in layer_name))
        ):
            raise TypeError(f"layer_name must be None, a str or a list of str, got {layer_name!r}")
        super().__init__(task, layer_name, device)
        self.tol = tol
        self.transformation_kwargs = {
            "max_iter": max_iter,
            "mode": mode,
            "regularization": regularization,
            "reduction": reduction,
        }
        self.last_result: SolveResult | None = None

    # ---- the transformation ----------------------------------------------------------------
    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(H_D + λI)⁻¹ test_rep`` for ``test_rep`` ``[k, P]`` → ``[k, P]`` (one batched
        solve; every row is a right-hand side)."""
        if self.full_train_dataloader is None:
            raise ValueError(
                "full_train_dataloader is not set: call cache(full_train_loader) first"
            )
        model_params, _ = self.task.get_param(ckpt_idx, layer_name=self.layer_name)
        loss = self.task.get_loss_func(layer_name=self.layer_name, ckpt_idx=ckpt_idx)
        key = self.task.loss_func_data_key

        def func(params: Tensor, *batch: Any) -> Tensor:
            return loss(params, **{key: tuple(batch)})

        res = ihvp_dataset_cg(
            func,
            model_params,
            _OnDevice(self.full_train_dataloader, self.device),
            test_rep,
            rtol=max(self.tol, default_rtol(model_params.dtype)),
            tol=0.0,
            return_result=True,
            **self.transformation_kwargs,
        )
        assert isinstance(res, SolveResult)
        self.last_result = res
        if not res.converged:
            worst = float(torch.as_tensor(res.residual).max())
            warnings.warn(
                f"IFAttributorMetafluence: CG stopped at max_iter={res.iters} with relative "
                f"residual up to {worst:.3g} (tol={self.tol:g}); raise max_iter or "
                "regularization",
                RuntimeWarning,
                stacklevel=2,
            )
        return res.x.detach()

    def _compute_denom(
        self,
        ckpt_idx: int,
        train_batch_rep: Tensor,
        test_batch_rep: Tensor | None = None,
        relatif_method: str | None = None,
    ) -> Tensor:
        """RelatIF's denominator per train point ``[b]``: ``"l"``:
        ``sqrt(max(g_iᵀ H⁻¹ g_i, 1e-12))`` (``g_i`` on the left the test-target gradient of
        the train point, ``test_batch_rep``), ``"theta"``: ``max(‖H⁻¹ g_i‖, 1e-12)`` (dattri's
        formulas)."""
        method = _check_relatif(relatif_method)
        if method is None:
            return train_batch_rep.new_ones(train_batch_rep.shape[0])
        transformed = self.transform_test_rep(ckpt_idx, train_batch_rep)
        if method == "l":
            if test_batch_rep is None:
                raise ValueError("relatif_method='l' needs test_batch_rep")
            return (test_batch_rep * transformed).sum(dim=1).clamp_min(1e-12).sqrt()
        return transformed.norm(dim=1).clamp_min(1e-12)

    # ---- dattri's entry points ---------------------------------------------------------------
    def _start(self, train_dataloader: Any) -> None:
        """dattri's preamble: fall back to ``train_dataloader`` as the full training set (with
        dattri's warning) and warn about shuffling loaders."""
        if self.full_train_dataloader is None:
            self.full_train_dataloader = train_dataloader
            warnings.warn(
                "The full training data loader was NOT cached. Treating the train_dataloader "
                "as the full training data loader.",
                stacklevel=3,
            )
        _check_shuffle(train_dataloader)

    def _batches(self, loader: Any) -> Iterator[tuple[Tensor, ...]]:
        """Batches as dattri's representation functions take them: ``(1, batch, ...)``."""
        for batch in _OnDevice(loader, self.device):
            yield tuple(t.unsqueeze(0) for t in batch)

    def _train_reps(
        self, ckpt_idx: int, loader: Any, relatif_method: str | None, need_target: bool = False
    ) -> Iterator[tuple[Tensor, Tensor | None, Tensor]]:
        """Per train batch: ``(transformed train rep [b, P'], its test-target rep (computed for
        ``need_target`` or RelatIF "l", else None), RelatIF denominator [b])``."""
        for data in self._batches(loader):
            rep = self.generate_train_rep(ckpt_idx=ckpt_idx, data=data)
            target = None
            if need_target or relatif_method == "l":
                target = self.generate_test_rep(ckpt_idx=ckpt_idx, data=data)
            denom = self._compute_denom(ckpt_idx, rep, target, relatif_method)
            yield self.transform_train_rep(ckpt_idx=ckpt_idx, train_rep=rep), target, denom

    def attribute(
        self,
        train_dataloader: Any,
        test_dataloader: Any,
        relatif_method: str | None = None,
    ) -> Tensor:
        """``[n_train, n_test]`` scores ``g_iᵀ (H_D + λI)⁻¹ g_j`` (divided by RelatIF's
        denominator of train point ``i`` when ``relatif_method`` is ``"l"`` or ``"theta"``),
        averaged over the task's checkpoints. Per checkpoint: one solve for all test points,
        plus, for RelatIF, one per train batch."""
        relatif_method = _check_relatif(relatif_method)
        self._start(train_dataloader)
        _check_shuffle(test_dataloader)
        n_ckpt = len(self.task.get_checkpoints())
        total: Tensor | None = None
        for ckpt in range(n_ckpt):
            test_rep = torch.cat(
                [
                    self.generate_test_rep(ckpt_idx=ckpt, data=d)
                    for d in self._batches(test_dataloader)
                ]
            )
            x_test = self.transform_test_rep(ckpt, test_rep)  # [n_test, P]
            rows = [
                (rep @ x_test.T) / denom.unsqueeze(-1)
                for rep, _, denom in self._train_reps(ckpt, train_dataloader, relatif_method)
            ]
            scores = torch.cat(rows).detach()
            total = scores if total is None else total + scores
        assert total is not None
        return total / n_ckpt

    def self_attribute(self, train_dataloader: Any, relatif_method: str | None = None) -> Tensor:
        """``[n_train]`` self-influence ``g_iᵀ (H_D + λI)⁻¹ g_i`` (divided by RelatIF's
        denominator when ``relatif_method`` is set), averaged over the checkpoints; one
        solve per train batch."""
        relatif_method = _check_relatif(relatif_method)
        self._start(train_dataloader)
        n_ckpt = len(self.task.get_checkpoints())
        total: Tensor | None = None
        for ckpt in range(n_ckpt):
            vals = []
            reps = self._train_reps(ckpt, train_dataloader, relatif_method, need_target=True)
            for rep, target, denom in reps:
                assert target is not None
                x = self.transform_test_rep(ckpt, target)
                vals.append((rep * x).sum(dim=1) / denom)
            scores = torch.cat(vals).detach()
            total = scores if total is None else total + scores
        assert total is not None
        return total / n_ckpt
