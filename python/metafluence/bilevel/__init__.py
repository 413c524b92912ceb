"""Bilevel layer: inner maps, total gradients and total-Hessian operators (tasks: ``data/``)."""

from .curvature import Curvature, fit_curvature
from .inner import HeadOnly, Implicit, Unrolled
from .params import ParamSpec
from .point import CURVATURES, BilevelPoint
from .problem import MetaProblem

__all__ = [
    "CURVATURES",
    "BilevelPoint",
    "Curvature",
    "HeadOnly",
    "Implicit",
    "MetaProblem",
    "ParamSpec",
    "Unrolled",
    "fit_curvature",
]
