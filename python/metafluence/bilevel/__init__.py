"""Bilevel layer: tasks, inner maps, total gradients and total-Hessian operators."""

from .curvature import Curvature, fit_curvature
from .inner import HeadOnly, Implicit, Unrolled
from .params import ParamSpec
from .point import CURVATURES, BilevelPoint
from .problem import MetaProblem
from .source import TaskSource
from .tasks import Task, TaskBatch

__all__ = [
    "CURVATURES",
    "BilevelPoint",
    "Curvature",
    "HeadOnly",
    "Implicit",
    "MetaProblem",
    "ParamSpec",
    "Task",
    "TaskBatch",
    "TaskSource",
    "Unrolled",
    "fit_curvature",
]
