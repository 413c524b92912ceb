"""Adapters that let other libraries call metafluence as a backend.

* :mod:`metafluence.integrations.dattri`: drop-in ``ihvp_cg`` / ``ihvp_lissa`` /
  ``ihvp_arnoldi`` with dattri 0.3.0's signatures, plus ``ihvp_dataset_cg`` (one inverse of the
  whole-dataset Hessian). Does not import dattri itself.
* :mod:`metafluence.integrations.dattri_attributor`: ``IFAttributorMetafluence``, a dattri
  attributor (needs dattri) inverting the whole-training-set Hessian once.
* :mod:`metafluence.integrations.kronfluence`: kronfluence's per-sample-gradient, pairwise and
  self scores on metafluence kernels; ``use_metafluence_kernels()`` patches ``TrackedLinear``.
* :mod:`metafluence.integrations.models`: learn2learn / DDP / compile wrappers (``unwrap``,
  ``inner_from_maml``) and higher- or torch.func-style functional models (``FunctionalModel``).
* :mod:`metafluence.integrations.torchopt`: ``solve(matvec, b)`` linear solvers for
  ``torchopt.diff.implicit.custom_root(..., solve=...)``.

Submodules are imported on demand (``from metafluence.integrations import dattri``).
"""

__all__ = ["dattri", "dattri_attributor", "kronfluence", "models", "torchopt"]
