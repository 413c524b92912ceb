"""Few-shot models: Conv-4 (28×28 grey, 84×84 RGB) and an MLP; the classifier is ``head``.

All models are plain ``nn.Module``s without running statistics, so they can be evaluated
functionally under ``torch.func`` (``vmap`` over tasks, second-order autodiff).
"""

from .conv import MLP, Conv4, MaxPool2x2, build_model

__all__ = ["MLP", "Conv4", "MaxPool2x2", "build_model"]
