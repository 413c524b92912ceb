"""Pure-PyTorch reference twins of every fast op (same names and signatures)."""

from __future__ import annotations

from .psg import psg_conv2d, psg_linear
from .psg_reduce import psg_conv2d_dot, psg_conv2d_sqnorm, psg_linear_dot, psg_linear_sqnorm
from .solvers import cg_direction_, cg_update_, neumann_step_

__all__ = [
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
