"""Flat parameter layout shared by every bilevel computation.

Meta-parameters are given as ``dict[str, Tensor]`` (as ``model.named_parameters()`` yields
them). Internally every quantity lives in one flat vector ``λ ∈ R^P`` laid out as
``[fixed | adapted]``: the parameters the inner map leaves alone come first, the ones it adapts
(all of them for MAML/iMAML, the head for ANIL) last, so that the adapted block is the
contiguous slice ``λ[p_fixed:]`` of size ``p_adapt``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the flat layout ``[fixed | adapted]``."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    p_fixed: int

    @staticmethod
    def from_module(model: nn.Module, adapt: Sequence[str] | None = None) -> ParamSpec:
        """Layout for ``model``; ``adapt`` lists adapted names or name prefixes (None = all)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters")
        if adapt is None:
            fixed: list[tuple[str, Tensor]] = []
            adapted = named
        else:
            prefixes = tuple(adapt)

            def is_adapted(name: str) -> bool:
                return any(name == a or name.startswith(a + ".") for a in prefixes)

            fixed = [(n, p) for n, p in named if not is_adapted(n)]
            adapted = [(n, p) for n, p in named if is_adapted(n)]
            if not adapted:
                raise ValueError(
                    f"head/adapt={list(prefixes)} matches no parameter; "
                    f"parameters are {[n for n, _ in named]}"
                )
        order = fixed + adapted
        return ParamSpec(
            names=tuple(n for n, _ in order),
            shapes=tuple(p.shape for _, p in order),
            p_fixed=sum(p.numel() for _, p in fixed),
        )

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def size(self) -> int:
        """``P``, the number of meta-parameters."""
        return sum(self.numels)

    @property
    def p_adapt(self) -> int:
        return self.size - self.p_fixed

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """``dict → [P]`` in the layout order; raises KeyError naming a missing parameter."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"meta_params lacks {missing}; expected names {list(self.names)}")
        for n, s in zip(self.names, self.shapes, strict=True):
            if tuple(params[n].shape) != tuple(s):
                raise ValueError(
                    f"meta_params[{n!r}] has shape {tuple(params[n].shape)}, expected {tuple(s)}"
                )
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``[P] → dict`` of views (works under ``torch.func`` transforms).

        Uses one ``torch.split`` (whose backward is a single ``cat``) rather than a slice per
        parameter (whose backward zero-fills a ``[P]`` tensor per parameter).
        """
        parts = torch.split(flat, list(self.numels), dim=-1)
        return {
            n: t.view(*flat.shape[:-1], *s)
            for n, s, t in zip(self.names, self.shapes, parts, strict=True)
        }

    def unflatten_split(self, fixed: Tensor, adapted: Tensor) -> dict[str, Tensor]:
        """``([p_fixed], [p_adapt]) → dict``: each parameter is a view of its own block.

        Unlike ``unflatten(join(fixed, adapted))`` this keeps the fixed parameters independent
        of ``adapted``, so a derivative with respect to ``adapted`` does not trace through the
        fixed part of the model (e.g. the ANIL body).
        """
        numels = list(self.numels)
        n_fixed = 0
        while sum(numels[:n_fixed]) < self.p_fixed:
            n_fixed += 1
        parts = list(torch.split(fixed, numels[:n_fixed])) if n_fixed else []
        parts += list(torch.split(adapted, numels[n_fixed:]))
        return {n: t.view(s) for n, s, t in zip(self.names, self.shapes, parts, strict=True)}

    def split(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., P] → ([..., p_fixed], [..., p_adapt])``."""
        return flat[..., : self.p_fixed], flat[..., self.p_fixed :]

    @staticmethod
    def join(fixed: Tensor, adapted: Tensor) -> Tensor:
        return torch.cat([fixed, adapted], dim=-1)

    def names_of(self, block: str) -> Iterable[str]:
        k = 0
        for n, c in zip(self.names, self.numels, strict=True):
            in_fixed = k < self.p_fixed
            if (block == "fixed") == in_fixed:
                yield n
            k += c
