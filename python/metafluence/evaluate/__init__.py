"""Ground truth, metrics, baselines and plots."""

from . import baselines as baselines
from . import detection as detection
from . import plots as plots
from .baselines import (
    BASELINES,
    BaselineScores,
    direct_if,
    ekfac_if,
    gradient_ascent_unlearn,
    loss_ranking,
    random_scores,
    tracin,
)
from .detection import detection_auc, detection_curve, recall_at_k
from .groups import (
    group_reweighted,
    leave_group_out,
    meta_train_retrain,
    predicted_group_effects,
    relative_error,
)
from .lds import lds, lds_predictions, random_subsets
from .loo import (
    StationaryRetrain,
    item_index,
    leave_one_out,
    newton_retrain,
    reweighted,
    stationary_retrain,
    target_value,
)
from .metrics import adapted_performance, correlation

__all__ = [
    "BASELINES",
    "adapted_performance",
    "BaselineScores",
    "baselines",
    "correlation",
    "detection",
    "detection_auc",
    "detection_curve",
    "direct_if",
    "ekfac_if",
    "gradient_ascent_unlearn",
    "group_reweighted",
    "item_index",
    "lds",
    "lds_predictions",
    "leave_group_out",
    "leave_one_out",
    "loss_ranking",
    "meta_train_retrain",
    "newton_retrain",
    "stationary_retrain",
    "StationaryRetrain",
    "plots",
    "predicted_group_effects",
    "random_scores",
    "random_subsets",
    "recall_at_k",
    "relative_error",
    "reweighted",
    "target_value",
    "tracin",
]
