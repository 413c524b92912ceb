"""Influence layer: removal effects, parameter influence, editing."""

from .removal import (
    ITEMS,
    InfluenceResult,
    diagnose,
    edit,
    param_influence,
    removal_effects,
    target_gradient,
)

__all__ = [
    "ITEMS",
    "InfluenceResult",
    "diagnose",
    "edit",
    "param_influence",
    "removal_effects",
    "target_gradient",
]
