"""Linear solvers for ``torchopt.diff.implicit.custom_root(..., solve=...)`` (jaxopt style).

torchopt calls ``solve(matvec, b)`` with ``b`` a tree of tensors (a tuple of tensors, one per
solution tensor) and ``matvec`` mapping such a tree to a tree of the same structure, and expects
``x`` with ``matvec(x) = b`` (same structure as ``b``). The factories here mirror
``torchopt.linear_solve.solve_cg(**kwargs)`` and return such a function, backed by the
metafluence solvers (:mod:`metafluence.solvers`)::

    import torchopt
    from metafluence.integrations.torchopt import solve_cg

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(inner_objective), argnums=1, solve=solve_cg(ridge=1e-4, rtol=1e-8)
    )
    def inner_solver(params, meta_params, data): ...

The tree is flattened into one vector ``[P]`` (leaves concatenated in ``torch.utils._pytree``
order), solved, and unflattened. ``ridge`` solves ``(A + ridge I) x = b`` as torchopt does;
``init`` is an optional starting tree (CG only). Unlike CG, the Neumann solver needs ``A``
symmetric positive definite (the usual case: ``A`` is the Hessian of a strongly convex inner
objective); CG needs it symmetric positive definite too, as torchopt's ``solve_cg`` does.

This module does not import torchopt.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .. import solvers as _solvers
from ..solvers import SolveResult

__all__ = ["LinearSolver", "solve_cg", "solve_direct", "solve_neumann", "tree_solve"]

LinearSolver = Callable[[Callable[[Any], Any], Any], Any]
"""``(matvec, b) -> x`` with ``b``, ``x`` trees of tensors (torchopt's ``LinearSolver``)."""


def _flatten(tree: Any) -> tuple[Tensor, list[torch.Size], Any]:
    leaves, spec = pytree.tree_flatten(tree)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise TypeError("b must be a tensor or a non-empty tree of tensors")
    shapes = [t.shape for t in leaves]
    dtype = leaves[0].dtype
    for t in leaves[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in leaves])
    return flat, shapes, spec


def _unflatten(flat: Tensor, shapes: list[torch.Size], spec: Any, like: list[Tensor]) -> Any:
    out, start = [], 0
    for shape, ref in zip(shapes, like, strict=True):
        n = shape.numel()
        out.append(flat[start : start + n].reshape(shape).to(ref.dtype))
        start += n
    return pytree.tree_unflatten(out, spec)


def tree_solve(
    method: str,
    matvec: Callable[[Any], Any],
    b: Any,
    ridge: float | None = None,
    init: Any = None,
    **options: Any,
) -> tuple[Any, SolveResult]:
    """Solve ``(A + ridge I) x = b`` for trees ``b`` with the metafluence solver ``method``
    (``"cg"``, ``"neumann"``, ``"direct"``, ``"arnoldi"``); returns ``(x_tree, SolveResult)``."""
    leaves = pytree.tree_leaves(b)
    flat_b, shapes, spec = _flatten(b)

    def flat_matvec(v: Tensor) -> Tensor:
        y = matvec(_unflatten(v, shapes, spec, leaves))
        return _flatten(y)[0].to(v.dtype)

    if init is not None:
        if method != "cg":
            raise ValueError(f"init is only supported by method='cg', got {method!r}")
        options["x0"] = _flatten(init)[0].to(flat_b.dtype)
    if method == "direct":
        options.setdefault("dim", flat_b.numel())
    res = _solvers.get_solver(method)(flat_matvec, flat_b.detach(), damping=ridge or 0.0, **options)
    return _unflatten(res.x, shapes, spec, leaves), res


def _factory(method: str, defaults: dict[str, Any], kwargs: dict[str, Any]) -> LinearSolver:
    opts = {**defaults, **kwargs}
    ridge = opts.pop("ridge", None)
    init = opts.pop("init", None)

    def solve(matvec: Callable[[Any], Any], b: Any) -> Any:
        o = dict(opts)
        if method in ("cg", "neumann") and o.get("maxiter") is None:
            o["maxiter"] = 10 * sum(t.numel() for t in pytree.tree_leaves(b))  # as torchopt
        x, res = tree_solve(method, matvec, b, ridge=ridge, init=init, **o)
        solve.last_result = res  # type: ignore[attr-defined]
        return x

    solve.last_result = None  # type: ignore[attr-defined]
    return solve


def solve_cg(**kwargs: Any) -> LinearSolver:
    """Like ``torchopt.linear_solve.solve_cg``: ``(matvec, b) -> x`` solving ``(A + ridge I) x = b``
    by :func:`metafluence.solvers.solve_cg`. Keywords: ``ridge``, ``init``, ``rtol`` (default
    ``1e-5`` as torchopt), ``atol`` (``0``), ``maxiter`` (``10 · P`` as torchopt) and the other
    options of :func:`~metafluence.solvers.solve_cg`. The last :class:`SolveResult` is kept in
    ``solve.last_result`` (iterations, residual, convergence)."""
    return _factory("cg", {"rtol": 1e-5, "atol": 0.0, "maxiter": None}, kwargs)


def solve_neumann(**kwargs: Any) -> LinearSolver:
    """``(matvec, b) -> x`` by the Neumann series (:func:`metafluence.solvers.solve_neumann`):
    ``ridge``, ``scale``, ``rtol`` (``1e-5``), ``maxiter`` (``10 · P``), ..."""
    return _factory("neumann", {"rtol": 1e-5, "maxiter": None}, kwargs)


def solve_direct(**kwargs: Any) -> LinearSolver:
    """``(matvec, b) -> x`` by a dense factorisation of the operator
    (:func:`metafluence.solvers.solve_direct`, small ``P`` only): ``ridge``, ``max_dim``, ..."""
    return _factory("direct", {}, kwargs)
