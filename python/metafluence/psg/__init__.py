"""Per-sample gradients for modules (registry keyed by module class), fused per-sample gradient
dot products and norms, and per-sample logit Jacobians. See :mod:`metafluence.psg.core` for
what is computed (including BatchNorm with batch statistics) and how."""

from __future__ import annotations

from .core import (
    logit_jacobians,
    per_sample_grad_dots,
    per_sample_grad_norms,
    per_sample_grads,
    uses_batch_statistics,
)
from .registry import Call, FuncRule, Rule, get_rule, register_rule, registered_classes
from .rules import conv2d_weight_psg

__all__ = [
    "Call",
    "FuncRule",
    "Rule",
    "conv2d_weight_psg",
    "get_rule",
    "logit_jacobians",
    "per_sample_grad_dots",
    "per_sample_grad_norms",
    "per_sample_grads",
    "register_rule",
    "registered_classes",
    "uses_batch_statistics",
]
