"""Registry of per-sample-gradient rules, keyed by module class.

A rule turns what one ordinary forward + backward captured at a module -- its input
(``activations``) and the gradient of the summed loss w.r.t. its output (``grad_outputs``) --
into per-sample gradients of the module's own parameters, and (optionally fused) their squared
norms and dot products with given vectors. With a summed loss and no interaction between samples
in the forward pass, ``grad_outputs[n]`` is exactly the gradient of sample ``n``'s own loss
w.r.t. the module's output for sample ``n`` (the opacus / kronfluence observation).

Lookup walks the class's MRO, so subclasses of registered classes use the parent's rule. Modules
with parameters but no rule use :class:`FuncRule` (``torch.func`` per module).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

__all__ = ["Call", "FuncRule", "Rule", "get_rule", "register_rule", "registered_classes"]


@dataclass
class Call:
    """One call of a module during the capturing forward pass.

    ``args``/``kwargs``: the forward inputs (``args[0]`` = ``activations``, ``[N, ...]``);
    ``grad_output``: gradient of the summed loss w.r.t. the output (``[N, ...]``, same shape);
    ``params``: the module's own parameters as used in the forward (local names);
    ``extras``: what the rule's :meth:`Rule.on_forward` kept from the forward pass.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Tensor
    grad_output: Tensor | None = None
    params: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def activations(self) -> Tensor:
        x = self.args[0]
        assert isinstance(x, Tensor)
        return x


class Rule:
    """Per-sample gradients of one module's own parameters from a :class:`Call`.

    Subclasses implement :meth:`grads`; :meth:`sqnorms` and :meth:`dots` default to reducing
    :meth:`grads` (fine for small parameters: norm scales, biases, embeddings' rows) and are
    overridden with fused forms for the large ones (Linear, Conv2d).
    """

    def on_forward(self, module: nn.Module, call: Call) -> None:
        """Called once per capture during the forward pass (the output's autograd graph is still
        intact): a rule may keep what it needs later in ``call.extras``. Default: nothing."""

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        """``{local name: [N, *shape]}`` for the parameters in ``names``."""
        raise NotImplementedError

    def sqnorms(self, module: nn.Module, call: Call, names: list[str]) -> Tensor:
        """``[N]``: ``Σ_{p in names} ‖∂ℓ_n/∂p‖²``."""
        grads = self.grads(module, call, names)
        n = call.activations.shape[0]
        out = call.activations.new_zeros(n, dtype=call.output.dtype)
        for g in grads.values():
            out = out + g.reshape(n, -1).pow(2).sum(1)
        return out

    def dots(
        self, module: nn.Module, call: Call, names: list[str], vectors: Mapping[str, Tensor]
    ) -> Tensor:
        """``[N, m]``: ``Σ_{p in names} ⟨∂ℓ_n/∂p, vectors[p][j]⟩``, vectors ``[m, *shape]``."""
        grads = self.grads(module, call, names)
        out: Tensor | None = None
        for name, g in grads.items():
            v = vectors[name]
            d = g.reshape(g.shape[0], -1) @ v.reshape(v.shape[0], -1).T
            out = d if out is None else out + d
        assert out is not None
        return out


class FuncRule(Rule):
    """Fallback for any module: per-sample ``vjp`` of the module itself under ``torch.func.vmap``
    (each sample's input row through the module, pulled back with its own ``grad_output`` row).
    Exact when the module treats samples independently (it must accept a batch of one)."""

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        from torch.func import functional_call, vjp, vmap

        n = call.activations.shape[0]
        wanted = {k: call.params[k] for k in names}
        fixed = {k: v for k, v in call.params.items() if k not in wanted}
        batched = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in call.args]
        args = tuple(call.args)

        def one(p: dict[str, Tensor], *row_args: Any) -> Tensor:
            full = tuple(
                r.unsqueeze(0) if b else a for r, a, b in zip(row_args, args, batched, strict=True)
            )
            out = functional_call(module, {**p, **fixed}, full, call.kwargs)
            assert isinstance(out, Tensor)
            return out

        def per_sample(g_row: Tensor, *row_args: Any) -> dict[str, Tensor]:
            pull = vjp(lambda p: one(p, *row_args), wanted)[1]
            (res,) = pull(g_row.unsqueeze(0))
            return res

        in_dims = (0, *[0 if b else None for b in batched])
        assert call.grad_output is not None
        detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        out: dict[str, Tensor] = vmap(per_sample, in_dims=in_dims)(call.grad_output, *detached)
        return out


_RULES: dict[type, Rule] = {}
FUNC_RULE = FuncRule()


def register_rule(*classes: type) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: ``@register_rule(nn.Linear)`` registers an instance of the rule."""

    def deco(rule_cls: type[Rule]) -> type[Rule]:
        inst = rule_cls()
        for c in classes:
            _RULES[c] = inst
        return rule_cls

    return deco


def get_rule(module: nn.Module) -> Rule | None:
    """The rule registered for ``type(module)`` or its nearest base class; ``None`` if none."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None


def registered_classes() -> list[type]:
    return list(_RULES)
