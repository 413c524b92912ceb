"""Meta-training loops: first-order training, then a stationarity phase."""

from .meta_train import OPTIMIZERS, TrainState, grad_norm, meta_train
from .refine import RefineReport, newton_refine
from .stationary import StationarityReport, make_stationary, radial_floor

__all__ = [
    "OPTIMIZERS",
    "RefineReport",
    "StationarityReport",
    "TrainState",
    "grad_norm",
    "make_stationary",
    "meta_train",
    "newton_refine",
    "radial_floor",
]
