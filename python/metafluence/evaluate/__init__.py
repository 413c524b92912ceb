"""Ground truth and metrics."""

from .loo import item_index, leave_one_out, newton_retrain, reweighted, target_value
from .metrics import correlation

__all__ = [
    "correlation",
    "item_index",
    "leave_one_out",
    "newton_retrain",
    "reweighted",
    "target_value",
]
