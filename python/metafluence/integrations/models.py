"""Models from meta-learning libraries as plain ``nn.Module``s for :class:`metafluence.MetaProblem`.

:class:`~metafluence.MetaProblem` evaluates any ``nn.Module`` functionally
(``torch.func.functional_call``), so a plain module needs no adapter. Two other forms are common:

* **wrappers** holding the module, such as learn2learn's ``MAML`` / ``MetaSGD`` (``.module``),
  ``DataParallel`` / ``DistributedDataParallel`` (``.module``) and ``torch.compile``'s
  ``OptimizedModule`` (``._orig_mod``): :func:`unwrap` returns the module inside;
* **inner loops**: :func:`inner_from_maml` turns a learn2learn ``MAML`` wrapper's settings
  (``lr``, ``first_order``), or higher's inner optimizer (``diffopt`` of
  ``higher.innerloop_ctx``, or the ``torch.optim.SGD`` given to it), into
  :class:`metafluence.inner.Unrolled` with one call;
* **functional models**, a function of the parameters and the input, as built by ``higher``
  (``fmodel(x, params=[...])``) or written for ``torch.func`` (``f(params, x)``):
  :class:`FunctionalModel` registers the parameters on a module so that ``functional_call`` can
  substitute them.

None of these import learn2learn or higher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..bilevel.inner import Unrolled

__all__ = ["FunctionalModel", "inner_from_maml", "unwrap"]

_WRAPPER_CLASSES = {"MAML", "MetaSGD", "GBML", "DataParallel", "DistributedDataParallel"}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside learn2learn / DataParallel / DDP / ``torch.compile`` wrappers (nested
    wrappers are peeled one after the other); a plain module is returned unchanged."""
    seen = 0
    while seen < 16:
        seen += 1
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in _WRAPPER_CLASSES and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            return model
    raise ValueError("unwrap: more than 16 nested wrappers")


def _is_higher_patched(obj: Any) -> bool:
    return any(c.__name__ == "_MonkeyPatchBase" for c in type(obj).__mro__)


def _is_higher_optimizer(obj: Any) -> bool:
    return any(c.__name__ == "DifferentiableOptimizer" for c in type(obj).__mro__)


def _higher_param_names(fmodel: Any) -> list[str]:
    """Dotted names of a higher patched module's fast parameters, in their order (the order of
    the original module's ``parameters()``: each module's own, then its children's)."""
    return [
        f"{prefix}.{n}" if prefix else n
        for prefix, m in fmodel.named_modules()
        for n in getattr(m, "_param_names", ())
    ]


def _sgd_settings(source: Any, what: str) -> tuple[float, list[list[int]]]:
    """``(lr, parameter indices per group)`` of a plain-SGD optimizer (torch or higher): one
    ``lr`` for every group, no momentum, weight decay or Nesterov (ValueError naming each)."""
    groups = getattr(source, "param_groups", None)
    if not groups:
        raise TypeError(f"{what} has no param_groups")
    lrs = set()
    for i, g in enumerate(groups):
        for key in ("momentum", "weight_decay"):
            if float(g.get(key, 0.0) or 0.0) != 0.0:
                raise ValueError(
                    f"{what}.param_groups[{i}][{key!r}] = {g[key]}: Unrolled takes plain "
                    f"gradient steps θ ← θ − lr ∇L (set {key}=0)"
                )
        for key in ("nesterov", "maximize"):
            if g.get(key, False):
                raise ValueError(f"{what}.param_groups[{i}][{key!r}] is True: expected False")
        lr = g.get("lr")
        if isinstance(lr, Tensor):
            lr = float(lr.detach())
        lrs.add(float(lr))
    if len(lrs) != 1:
        raise ValueError(
            f"{what} has param groups with different lr {sorted(lrs)}: Unrolled takes one step "
            "size for every adapted parameter"
        )
    index = getattr(source, "_group_to_param_list", None)
    return lrs.pop(), [list(ix) for ix in index] if index is not None else []


def inner_from_maml(
    source: Any,
    steps: int = 1,
    *,
    lr: float | None = None,
    first_order: bool | None = None,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> Unrolled:
    """:class:`~metafluence.inner.Unrolled` (``steps`` steps ``θ ← θ − lr ∇_θ L_S(θ)``) from the
    inner loop of a learn2learn or higher MAML, in one call.

    ``source`` may be:

    * a learn2learn ``MAML`` wrapper: its ``lr`` and ``first_order``;
    * a higher differentiable optimizer (``diffopt`` of ``higher.innerloop_ctx(model, opt)``,
      a ``DifferentiableSGD``): its ``lr``, ``first_order = not track_higher_grads``, and, when
      its parameter groups cover only some of the model's parameters, ``adapt`` = their names
      (from the patched module it is attached to, or ``model``);
    * a ``torch.optim.SGD`` (the inner optimizer handed to higher): its ``lr``; ``adapt`` when
      ``model`` is given and the optimizer holds only some of its parameters;
    * a higher patched module (``fmodel``): ``first_order = not track_higher_grads``; it holds
      no step size, so ``lr`` must be given.

    ``steps`` is the number of inner steps per task in the user's loop (``adapt`` /
    ``diffopt.step`` calls); ``lr`` and ``first_order`` override what ``source`` says;
    ``kwargs`` go to :class:`Unrolled`. Raises ``TypeError`` for anything else (learn2learn's
    ``MetaSGD``, with learned per-parameter step sizes, included) and ``ValueError`` for
    optimizer settings an unrolled map does not have (momentum, weight decay, Nesterov,
    several step sizes). The model for :class:`~metafluence.MetaProblem` is ``unwrap(source)``
    for a learn2learn wrapper and the user's own module for higher.
    """
    name = type(source).__name__
    fo: bool = False
    adapt: list[str] | None = None
    if name == "MetaSGD":
        raise TypeError(
            "inner_from_maml: learn2learn MetaSGD learns a step size per parameter, which "
            "metafluence.inner.Unrolled (one lr) does not model"
        )
    if _is_higher_optimizer(source):
        if name != "DifferentiableSGD":
            raise TypeError(
                f"inner_from_maml: higher {name} is not a plain gradient step; expected a "
                "DifferentiableSGD (higher.innerloop_ctx with torch.optim.SGD)"
            )
        found, index = _sgd_settings(source, "diffopt")
        fo = not bool(getattr(source, "_track_higher_grads", True))
        fmodel = getattr(source, "_fmodel", None)
        names = _higher_param_names(fmodel) if fmodel is not None else None
        if names is None and model is not None:
            names = [n for n, _ in model.named_parameters()]
        used = sorted({i for ix in index for i in ix})
        if names is not None and used != list(range(len(names))):
            adapt = [names[i] for i in used]
    elif isinstance(source, torch.optim.Optimizer):
        if not isinstance(source, torch.optim.SGD):
            raise TypeError(f"inner_from_maml: {name} is not torch.optim.SGD")
        found, _ = _sgd_settings(source, name)
        if model is not None:
            held = {id(p) for g in source.param_groups for p in g["params"]}
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not all(id(p) in held for _, p in named):
                adapt = [n for n, p in named if id(p) in held]
    elif _is_higher_patched(source):
        if lr is None:
            raise TypeError(
                "inner_from_maml: a higher patched module holds no step size; pass lr=... or "
                "the differentiable optimizer (diffopt) instead"
            )
        found = lr
        fo = not bool(getattr(source, "track_higher_grads", True))
    else:
        found = getattr(source, "lr", None)
        if found is None or not isinstance(getattr(source, "module", None), nn.Module):
            raise TypeError(
                f"inner_from_maml: {name} is neither a learn2learn MAML wrapper (with `lr` and "
                "`module`) nor a higher differentiable optimizer / patched module nor a "
                "torch.optim.SGD"
            )
        if isinstance(found, Tensor):
            found = float(found.detach())
        fo = bool(getattr(source, "first_order", False))
    if adapt is not None:
        kwargs.setdefault("adapt", adapt)
    return Unrolled(
        steps=steps,
        lr=float(found if lr is None else lr),
        first_order=fo if first_order is None else bool(first_order),
        **kwargs,
    )


class FunctionalModel(nn.Module):
    """An ``nn.Module`` around a functional model so that :class:`~metafluence.MetaProblem` can
    substitute its parameters.

    Args:
        fn: the functional model. ``style="higher"``: ``fn(x, params=[p_0, ..., p_n])`` (higher's
            ``monkeypatch`` result); ``style="func"``: ``fn(params, x)`` with ``params`` the
            list of tensors (torch.func / JAX style).
        params: the initial parameters (copied into ``nn.Parameter``s named ``p0``, ``p1``, ...
            unless ``names`` are given).
        names: optional parameter names (valid attribute names, e.g. ``"conv1_weight"``).
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        params: Sequence[Tensor],
        style: str = "higher",
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if style not in ("higher", "func"):
            raise ValueError(f"style must be 'higher' or 'func', got {style!r}")
        params = list(params)
        names = [f"p{i}" for i in range(len(params))] if names is None else list(names)
        if len(names) != len(params):
            raise ValueError(f"{len(names)} names for {len(params)} parameters")
        self.fn = fn
        self.style = style
        self._names = names
        for name, p in zip(names, params, strict=True):
            self.register_parameter(name, nn.Parameter(p.detach().clone()))

    def params(self) -> list[Tensor]:
        """The parameters in ``fn``'s order (substituted ones inside ``functional_call``)."""
        return [getattr(self, name) for name in self._names]

    def forward(self, x: Tensor) -> Tensor:
        if self.style == "higher":
            return self.fn(x, params=self.params())
        return self.fn(self.params(), x)
