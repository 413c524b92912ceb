"""Bilevel layer: tasks, inner maps, total gradients and total-Hessian operators."""

from .inner import HeadOnly, Implicit, Unrolled
from .params import ParamSpec
from .point import CURVATURES, BilevelPoint
from .problem import MetaProblem
from .source import TaskSource
from .tasks import Task, TaskBatch

__all__ = [
    "CURVATURES",
    "BilevelPoint",
    "HeadOnly",
    "Implicit",
    "MetaProblem",
    "ParamSpec",
    "Task",
    "TaskBatch",
    "TaskSource",
    "Unrolled",
]
