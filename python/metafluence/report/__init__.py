"""The main job (``metafluence run``) and its report: detection metrics, plots, HTML/Markdown."""

from .metrics import recall_at_k, recall_curve, roc_auc, roc_curve

__all__ = ["recall_at_k", "recall_curve", "roc_auc", "roc_curve"]
