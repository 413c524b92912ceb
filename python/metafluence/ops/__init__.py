"""One Python entry per op: each picks native | triton | reference and can say why
(see :mod:`metafluence.ops._dispatch`)."""

from __future__ import annotations

from ._dispatch import BackendUnavailableError
from .psg_conv2d import Conv2dGeometry, psg_conv2d, psg_conv2d_dot, psg_conv2d_sqnorm
from .psg_linear import psg_linear
from .psg_linear_dot import psg_linear_dot
from .psg_linear_sqnorm import psg_linear_sqnorm
from .solver_update import cg_direction_, cg_update_, neumann_step_

__all__ = [
    "BackendUnavailableError",
    "Conv2dGeometry",
    "cg_direction_",
    "cg_update_",
    "neumann_step_",
    "psg_conv2d",
    "psg_conv2d_dot",
    "psg_conv2d_sqnorm",
    "psg_linear",
    "psg_linear_dot",
    "psg_linear_sqnorm",
]
