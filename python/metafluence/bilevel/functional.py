"""The model as a pure function of a flat parameter vector, and its body/head split.

Head-only (ANIL) inner maps adapt only a head module ``h`` that the model applies last:
``logits(Θ, x) = h(θ_a; φ(λ_f; x))``. The body features ``φ(λ_f; x)`` then depend on the fixed
block only, so an engine computes them once per chunk of tasks (and, for derivatives in ``λ``,
pushes tangents / pulls cotangents through the body once) and runs every inner step, Newton
iteration and inner solve on the features. :meth:`FunctionalModel.split` finds and verifies such
a split; without one the "features" are the inputs themselves and nothing changes.

BatchNorm in training mode (MAML's transductive setting) normalises every set by its own batch
statistics, with or without running-statistics buffers; in eval mode by its running statistics.
Every evaluation runs under :func:`pure_batch_norm`: the layers compute that formula from
elementary ops, so they never write their buffers (an in-place write that ``torch.func``
transforms refuse) and their second derivatives are right under ``vmap`` (``F.batch_norm``'s
are not: ``grad(vmap(grad(f)))`` and nested ``jvp`` of it are off by up to a few percent in
torch 2.13, pytorch issue 196699).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .losses import PerSampleLoss, weighted_mean
from .params import ParamSpec

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batch_norms(model: nn.Module) -> tuple[nn.Module, ...]:
    """The BatchNorm layers of ``model`` (any dimension, ``SyncBatchNorm`` included)."""
    return tuple(m for m in model.modules() if isinstance(m, _BatchNorm))


def _batch_norm(m: nn.Module, x: Tensor) -> Tensor:
    """``y = (x − μ) / sqrt(σ² + eps) · weight + bias`` per channel (dim 1) for BatchNorm ``m``:
    ``μ, σ²`` the batch mean and biased variance over every dim but 1 in training mode (or
    without running statistics), else ``running_mean``, ``running_var``."""
    m._check_input_dim(x)  # type: ignore[operator]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if m.training or m.running_mean is None:
        dims = (0, *range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
    else:
        mean, var = m.running_mean.view(shape), m.running_var.view(shape)
    y = (x - mean) * torch.rsqrt(var + m.eps)
    if m.weight is not None:
        y = y * m.weight.view(shape)
    if m.bias is not None:
        y = y + m.bias.view(shape)
    return y


@contextmanager
def pure_batch_norm(layers: tuple[nn.Module, ...]) -> Iterator[None]:
    """Inside: each of ``layers`` (BatchNorm) computes its forward by :func:`_batch_norm` —
    batch statistics in training mode, running statistics in eval mode, the values of its own
    forward — and writes no buffer (``running_mean``, ``running_var``,
    ``num_batches_tracked`` stay as they are)."""
    saved = [(m, m.__dict__.get("forward")) for m in layers]
    for m, _ in saved:
        m.forward = partial(_batch_norm, m)
    try:
        yield
    finally:
        for m, old in saved:
            if old is None:
                del m.forward
            else:
                m.forward = old


@dataclass
class FunctionalModel:
    """``logits(Θ, x)`` with ``Θ [P]`` in :class:`ParamSpec` layout; set losses of math.md §1.

    ``cache_body=False`` disables the body/head split (the reference path of head-only maps).
    """

    model: nn.Module
    spec: ParamSpec
    loss_fn: PerSampleLoss
    cache_body: bool = True
    _body_head: Any = field(default=None, init=False, repr=False, compare=False)
    _batch_norms: tuple[nn.Module, ...] = field(default=(), init=False, repr=False)

    def __post_init__(self) -> None:
        self._batch_norms = batch_norms(self.model)

    def call(self, module: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``module`` (the model or one of its submodules) evaluated with ``params`` on ``x``,
        its BatchNorm layers by :func:`pure_batch_norm`."""
        with pure_batch_norm(self._batch_norms):
            return torch.func.functional_call(module, params, (x,))

    def logits(self, theta: Tensor, x: Tensor) -> Tensor:
        return self.call(self.model, self.spec.unflatten(theta), x)

    def logits_split(self, fixed: Tensor, adapted: Tensor, x: Tensor) -> Tensor:
        """``logits`` with the fixed and adapted blocks passed separately (see unflatten_split)."""
        return self.call(self.model, self.spec.unflatten_split(fixed, adapted), x)

    def set_loss_split(self, fixed: Tensor, adapted: Tensor, x: Tensor, y: Tensor, w: Tensor):
        """``L((fixed, adapted); S, w)``."""
        return weighted_mean(self.loss_fn(self.logits_split(fixed, adapted, x), y), w)

    def per_sample_loss(self, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """``ℓ(z_j; Θ)`` for ``x [n, ...]``, ``y [n]`` → ``[n]``."""
        return self.loss_fn(self.logits(theta, x), y)

    def set_loss(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """``L(Θ; S, w) = Σ_j w_j ℓ(z_j; Θ) / n``."""
        return weighted_mean(self.per_sample_loss(theta, x, y), w)

    def split(self, lam: Tensor, x: Tensor | None) -> Whole | BodyHead:
        """The :class:`BodyHead` split when the adapted block is a head applied last (checked
        once on the sample inputs ``x [n, ...]`` at ``λ``), else :class:`Whole`."""
        if not self.cache_body or x is None or self.spec.p_fixed == 0:
            return Whole(self)
        if self._body_head is None:
            self._body_head = BodyHead.find(self, lam, x) or False
        return self._body_head or Whole(self)


class Whole:
    """No split: the features are the inputs and the whole model runs on them."""

    cached = False

    def __init__(self, fm: FunctionalModel) -> None:
        self.fm = fm

    def features(self, fixed: Tensor, x: Tensor) -> Tensor:
        return x

    def set_loss(self, fixed: Tensor, adapted: Tensor, f: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """``L((fixed, adapted); (f, y), w)`` on features ``f`` (here the inputs)."""
        return self.fm.set_loss_split(fixed, adapted, f, y, w)

    def logits(self, fixed: Tensor, adapted: Tensor, f: Tensor) -> Tensor:
        return self.fm.logits_split(fixed, adapted, f)

    def outer_loss(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``L(Θ; (x, y), v)`` for the full flat ``Θ [P]`` and raw inputs ``x``."""
        return self.fm.set_loss(theta, x, y, v)


class BodyHead(Whole):
    """``logits(Θ, x) = head(θ_a; body(λ_f; x))`` for a head module ``model.<path>``."""

    cached = True

    def __init__(self, fm: FunctionalModel, path: str) -> None:
        super().__init__(fm)
        self.path = path
        self.head = fm.model.get_submodule(path)
        parent, _, self.attr = path.rpartition(".")
        self.parent = fm.model.get_submodule(parent) if parent else fm.model
        spec = fm.spec
        names, numels = list(spec.names), list(spec.numels)
        k = n_fixed = 0
        while k < spec.p_fixed:
            k += numels[n_fixed]
            n_fixed += 1
        self.fixed_names, self.fixed_numels = names[:n_fixed], numels[:n_fixed]
        self.fixed_shapes = spec.shapes[:n_fixed]
        cut = len(path) + 1
        self.head_names = [n[cut:] for n in names[n_fixed:]]
        self.head_numels, self.head_shapes = numels[n_fixed:], spec.shapes[n_fixed:]
        self._identity = nn.Identity()

    @staticmethod
    def find(fm: FunctionalModel, lam: Tensor, x: Tensor) -> BodyHead | None:
        """A verified split, or None: the adapted parameters are exactly one submodule's
        trainable parameters, that submodule runs once and its output *is* the model's output,
        and ``head(body(x))`` equals ``logits(λ, x)`` bitwise."""
        adapted = list(fm.spec.names_of("adapted"))
        paths = [n.split(".")[:-1] for n in adapted]
        common = paths[0]
        for p in paths[1:]:
            i = 0
            while i < min(len(common), len(p)) and common[i] == p[i]:
                i += 1
            common = common[:i]
        if not common:
            return None
        path = ".".join(common)
        try:
            head = fm.model.get_submodule(path)
        except AttributeError:
            return None
        own = [f"{path}.{n}" for n, p in head.named_parameters() if p.requires_grad]
        if sorted(own) != sorted(adapted):
            return None
        try:
            split = BodyHead(fm, path)
            seen: list[Tensor] = []
            hook = head.register_forward_hook(lambda m, i, o: seen.append(o))
            with torch.no_grad():
                fixed, adapted_t = fm.spec.split(lam.detach())
                try:
                    full = fm.logits_split(fixed, adapted_t, x)
                finally:
                    hook.remove()
                if len(seen) != 1 or seen[0] is not full:
                    return None
                out = split.logits(fixed, adapted_t, split.features(fixed, x))
            return split if torch.equal(out, full) else None
        except Exception:  # noqa: BLE001 - any failure means "no usable split"
            return None

    @contextmanager
    def _headless(self) -> Iterator[None]:
        old = self.parent._modules[self.attr]
        self.parent._modules[self.attr] = self._identity
        try:
            yield
        finally:
            self.parent._modules[self.attr] = old

    def features(self, fixed: Tensor, x: Tensor) -> Tensor:
        """``body(λ_f; x)``: the model with its head replaced by the identity."""
        parts = torch.split(fixed, self.fixed_numels) if self.fixed_numels else ()
        params = {
            n: t.view(s) for n, s, t in zip(self.fixed_names, self.fixed_shapes, parts, strict=True)
        }
        with self._headless():
            return self.fm.call(self.fm.model, params, x)

    def logits(self, fixed: Tensor, adapted: Tensor, f: Tensor) -> Tensor:
        """``head(θ_a; f)`` (``fixed`` unused: the head has no fixed parameters)."""
        parts = torch.split(adapted, self.head_numels)
        params = {
            n: t.view(s) for n, s, t in zip(self.head_names, self.head_shapes, parts, strict=True)
        }
        return self.fm.call(self.head, params, f)

    def set_loss(self, fixed: Tensor, adapted: Tensor, f: Tensor, y: Tensor, w: Tensor) -> Tensor:
        return weighted_mean(self.fm.loss_fn(self.logits(fixed, adapted, f), y), w)

    def outer_loss(self, theta: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        fixed, adapted = self.fm.spec.split(theta)
        return self.set_loss(fixed, adapted, self.features(fixed, x), y, v)
