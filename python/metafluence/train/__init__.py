"""Meta-training loops."""

from .meta_train import OPTIMIZERS, TrainState, grad_norm, meta_train, newton_refine

__all__ = ["OPTIMIZERS", "TrainState", "grad_norm", "meta_train", "newton_refine"]
