"""Meta-training loops."""

from .meta_train import OPTIMIZERS, grad_norm, meta_train, newton_refine

__all__ = ["OPTIMIZERS", "grad_norm", "meta_train", "newton_refine"]
