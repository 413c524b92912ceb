"""Models from meta-learning libraries as plain ``nn.Module``s for :class:`metafluence.MetaProblem`.

:class:`~metafluence.MetaProblem` evaluates any ``nn.Module`` functionally
(``torch.func.functional_call``), so a plain module needs no adapter. Two other forms are common:

* **wrappers** holding the module, such as learn2learn's ``MAML`` / ``MetaSGD`` (``.module``),
  ``DataParallel`` / ``DistributedDataParallel`` (``.module``) and ``torch.compile``'s
  ``OptimizedModule`` (``._orig_mod``): :func:`unwrap` returns the module inside, and
  :func:`inner_from_maml` turns a learn2learn ``MAML`` wrapper's settings (``lr``,
  ``first_order``) into :class:`metafluence.inner.Unrolled`;
* **functional models**, a function of the parameters and the input, as built by ``higher``
  (``fmodel(x, params=[...])``) or written for ``torch.func`` (``f(params, x)``):
  :class:`FunctionalModel` registers the parameters on a module so that ``functional_call`` can
  substitute them.

None of these import learn2learn or higher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def inner_from_maml(wrapper: Any, steps: int = 1, **kwargs: Any) -> Unrolled:
    """:class:`~metafluence.inner.Unrolled` with the step size and first-order flag of a
    learn2learn ``MAML`` wrapper (``wrapper.lr``, ``wrapper.first_order``); ``steps`` is the
    number of ``adapt`` calls per task in the user's training loop."""
    lr = getattr(wrapper, "lr", None)
    if lr is None:
        raise TypeError(f"{type(wrapper).__name__} has no `lr`: not a learn2learn MAML wrapper")
    return Unrolled(
        steps=steps,
        lr=float(lr),
        first_order=bool(getattr(wrapper, "first_order", False)),
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
