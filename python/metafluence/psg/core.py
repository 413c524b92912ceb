"""Per-sample gradients, their fused dot products and norms, and per-sample logit Jacobians.

Which gradient is computed
--------------------------
``params`` is a dict like ``model.named_parameters()`` (names not in it are held fixed at the
model's own values). For a batch ``x [N, ...]``, ``y`` the model computes ``logits =
model(x; θ)`` and per-sample losses ``ℓ_n(θ) = loss(logits, y)[n]``. The per-sample gradient of
sample ``n`` is the total derivative of **its own loss** on this batch::

    G_n = dℓ_n(θ) / dθ        (ordinary autograd on the batch, then row n)

* If samples do not interact in the forward pass (Linear, Conv, GroupNorm/LayerNorm,
  Embedding, BatchNorm with running statistics = eval mode, ...), this is the gradient of
  ``ℓ(model(x_n; θ), y_n)`` alone -- the same as ``torch.func.vmap(grad(...))``.
* If a BatchNorm normalises with **batch statistics** (training mode, or no running stats), then
  ``ℓ_n`` depends on θ also through the batch mean and variance, which every sample's
  activations enter. ``G_n`` then includes these exact cross-sample terms:
  ``G_n = Σ_m (∂ℓ_n/∂h_m)(∂h_m/∂θ)`` over all samples ``m`` of the batch, i.e. row ``n`` of the
  Jacobian of the loss vector ``[ℓ_1..ℓ_N]`` w.r.t. θ (``torch.func.jacrev``). Note
  ``Σ_n G_n`` is still the ordinary batch gradient. This mode costs about ``N`` backward
  passes (vmapped, in chunks); running statistics are never updated.

Methods
-------
``"hooks"`` (default when no batch-statistics BatchNorm is present): one ordinary forward pass
with forward hooks capturing each parametrised module's input and output, one backward pass of
``Σ_n ℓ_n`` **to the module outputs only** (no parameter gradients are computed), then the rule
of :mod:`metafluence.psg.registry` for each module turns (activations, grad_outputs) into
per-sample gradients / norms / dots. Modules without a rule use ``torch.func`` on that module.
``"func"``: ``torch.func`` for the whole model (``vmap(grad)``, or the exact Jacobian rows when
batch statistics couple samples). ``"auto"`` picks ``hooks`` unless batch statistics are used,
or the call is being traced by ``torch.compile`` (forward hooks cannot be registered inside a
graph: ``"func"`` is traced, ``"hooks"`` is not). Checks on values (label ranges) run eagerly
only; under tracing just the shape, dtype and device checks run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._checks import check_finite
from . import rules as _rules  # noqa: F401  (registers the standard rules)
from .losses import LossSpec, resolve_loss
from .registry import FUNC_RULE, Call, Rule, get_rule

__all__ = [
    "logit_jacobians",
    "per_sample_grad_dots",
    "per_sample_grad_norms",
    "per_sample_grads",
    "uses_batch_statistics",
]

Method = Literal["auto", "hooks", "func"]
_T = TypeVar("_T")


def uses_batch_statistics(model: nn.Module) -> bool:
    """True if some BatchNorm in ``model`` normalises with the statistics of the batch."""
    return any(_rules.batch_norm_uses_batch_stats(m) for m in model.modules())


# ---- validation ----------------------------------------------------------------------------------
def _check(model: Any, params: Any, x: Any, y: Any = None, loss: Any = None) -> bool:
    """Checks the arguments (types, shapes, devices, finite values, label signs); returns whether
    ``x`` and ``y`` must still be shown to fit the model and the loss (:func:`_fits`): true for a
    non-empty eager call with ``y`` and no BatchNorm (a probe forward would change no running
    statistics). :func:`_check_fit` does it by a 1-sample probe; the hooks path instead runs its
    own batched forward under :func:`_probe` and passes those logits to :func:`_fits` (one
    forward, not two)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model)}")
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty dict {name: Tensor} like named_parameters()")
    known = dict(model.named_parameters())
    for k, v in params.items():
        if k not in known:
            raise KeyError(f"params[{k!r}] is not a parameter of the model")
        if not isinstance(v, Tensor) or v.shape != known[k].shape:
            raise ValueError(
                f"params[{k!r}] has shape {getattr(v, 'shape', None)}, expected "
                f"{tuple(known[k].shape)}"
            )
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [N, ...] with the batch in dim 0")
    for k, v in params.items():
        if v.device != x.device:
            raise ValueError(f"params[{k!r}] is on {v.device} but x is on {x.device}")
    if y is None:
        return False
    if not isinstance(y, Tensor) or y.dim() < 1:
        raise ValueError("y must be a tensor [N, ...] with the batch in dim 0")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} samples but x has {x.shape[0]}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if torch.compiler.is_compiling():
        return False  # checks on values need the data: they run eagerly only (no graph branches)
    check_finite(x, "x")
    check_finite(y, "y")
    stateful = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if loss == "cross_entropy" and not y.is_floating_point() and bool((y < 0).any()):
        raise ValueError(f"y has label {int(y[y < 0][0])} < 0")
    return not stateful and bool(x.shape[0])


def _check_fit(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, y: Tensor, loss: Any
) -> None:
    """A 1-sample probe forward (no gradients): ``x`` fits the model, ``y`` the loss."""
    with torch.no_grad():
        out = _probe(lambda: functional_call(model, dict(params), (x[:1],)), _misfit_x(x))
    _fits(out, x, y, loss)


def _misfit_x(x: Tensor) -> str:
    return f"x of shape {tuple(x.shape)} (dtype {x.dtype}) does not fit the model"


def _fits(out: Tensor, x: Tensor, y: Tensor, loss: Any) -> None:
    """``y`` fits the loss on the model outputs ``out`` (``[N or 1, ...]``, first row probed):
    cross-entropy labels in range, MSE targets shaped like the outputs, the loss evaluates."""
    if loss == "cross_entropy" and not y.is_floating_point() and y.numel():
        _check_labels(y, out.shape[-1])
    if loss == "mse" and tuple(y.shape[1:]) != tuple(out.shape[1:]):  # would broadcast silently
        raise ValueError(
            f"y has shape {tuple(y.shape)}; loss='mse' needs targets shaped like the outputs: "
            f"[{x.shape[0]}, {', '.join(map(str, out.shape[1:]))}]"
        )
    if loss is not None:
        with torch.no_grad():
            _probe(
                lambda: resolve_loss(loss)(out[:1], y[:1]),
                f"y of shape {tuple(y.shape)} (dtype {y.dtype}) does not fit loss={loss!r} on "
                f"outputs of shape ({x.shape[0]}, {', '.join(map(str, out.shape[1:]))})",
            )


class _CaptureError(TypeError):
    """A module the hooks path cannot capture (raised from inside the forward; never turned
    into a ``does not fit`` error by :func:`_probe`)."""


def _probe(fn: Callable[[], _T], what: str) -> _T:
    """``fn()``, an error from inside torch turned into a ValueError saying ``what`` (out of
    memory and :class:`_CaptureError` pass through unchanged)."""
    try:
        return fn()
    except (torch.OutOfMemoryError, _CaptureError):
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{what} ({type(e).__name__}: {first})") from None


def _check_labels(y: Tensor, n_out: int) -> None:
    """Integer cross-entropy labels lie in ``[0, n_out)``."""
    bad = (y < 0) | (y >= n_out)
    if bool(bad.any()):
        raise ValueError(
            f"y has label {int(y[bad][0])} outside [0, {n_out}) (the model has {n_out} outputs)"
        )


def _check_vectors(params: Mapping[str, Tensor], vectors: Any) -> int:
    if not isinstance(vectors, Mapping):
        raise TypeError("vectors must be a dict {name: Tensor [m, *shape]}")
    m: int | None = None
    for k, p in params.items():
        if k not in vectors:
            raise KeyError(f"vectors has no entry for parameter {k!r}")
        v = vectors[k]
        if v.dim() != p.dim() + 1 or tuple(v.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"vectors[{k!r}] has shape {tuple(v.shape)}, expected "
                f"[m, {', '.join(map(str, p.shape))}]"
            )
        if m is None:
            m = v.shape[0]
        elif v.shape[0] != m:
            raise ValueError(f"vectors[{k!r}] has m={v.shape[0]}, other entries have m={m}")
    assert m is not None
    return m


# ---- capture -------------------------------------------------------------------------------------
@dataclass
class _Entry:
    module: nn.Module
    names: list[str]  # local names of this module's own params that are in `params`
    full: dict[str, str]  # local -> full name
    rule: Rule
    calls: list[Call]


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    """Buffers of training-mode BatchNorms are cloned so running statistics never change."""
    out: dict[str, Tensor] = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
            for bname, b in mod.named_buffers(recurse=False):
                if b is not None:
                    out[f"{mname}.{bname}" if mname else bname] = b.clone()
    return out


def _entries(model: nn.Module, params: Mapping[str, Tensor]) -> list[_Entry]:
    entries = []
    for mname, mod in model.named_modules():
        own = [k for k, _ in mod.named_parameters(recurse=False)]
        full = {k: f"{mname}.{k}" if mname else k for k in own}
        names = [k for k in own if full[k] in params]
        if names:
            rule = get_rule(mod) or FUNC_RULE
            entries.append(_Entry(mod, names, {k: full[k] for k in names}, rule, []))
    return entries


Consume = Callable[[_Entry, Call], None]


class _Tap(torch.autograd.Function):
    """Identity on a captured module output, returned as an alias (not a view: a later in-place
    op on it is recorded after the tap as usual, so the tap still sees the gradient w.r.t. the
    output as the module returned it). Its backward hands that gradient to ``sink`` and passes
    it on unchanged. Every tap also takes ``anchor``, one 0-dim leaf: a backward pass to the
    anchor visits every tap and computes no parameter gradient."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, sink: Callable[[Tensor], None]) -> Tensor:
        ctx.sink = sink
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.sink(grad)
        return grad, None, None


class _Capture:
    """One forward pass of the model with the output of every call of a parametrised module
    tapped (:class:`_Tap`), then backward passes that hand each call with its ``grad_output`` to
    a consumer (a rule turns it into per-sample gradients, norms or dots).

    A *streamed* pass hands each call over inside the backward, as soon as its ``grad_output``
    exists, so every gradient is used and freed as in an ordinary backward pass; holding them
    all to its end costs page faults on CPU (Conv-4 1x28x28, N = 25: +1,450 per call, ~10% of
    one batched forward + backward). Right for norms and dots, whose results are small. A
    *deferred* pass hands the calls over after the backward, when the graph's memory is free
    again: right for full per-sample gradients, whose ``[N, P]`` results would otherwise be
    allocated on top of the graph (there streaming costs page faults instead)."""

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> None:
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.entries = _entries(model, params)
        self.anchor = torch.zeros((), device=x.device, requires_grad=True)  # (never gets a value)
        self.consume: Consume | None = None
        self.retain = self.defer = False
        self.ready: list[tuple[_Entry, Call]] = []
        handles = [
            e.module.register_forward_hook(self._hook(e), with_kwargs=True) for e in self.entries
        ]
        try:
            self.logits = functional_call(model, {**p, **_buffers(model)}, (x,))
        except BaseException:
            self.close()
            raise
        finally:
            for h in handles:
                h.remove()

    def _hook(self, e: _Entry) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if not isinstance(output, Tensor):
                raise _CaptureError(
                    f"per-sample gradients: {type(mod).__name__} returned {type(output)}; "
                    "capture needs a tensor output (use method='func')"
                )
            own = {k: getattr(mod, k) for k, _ in mod.named_parameters(recurse=False)}
            call = Call(args=args, kwargs=kwargs, output=output, params=own)
            e.rule.on_forward(mod, call)
            e.calls.append(call)
            return _Tap.apply(output, self.anchor, lambda g: self._deliver(e, call, g))

        return hook

    def _deliver(self, e: _Entry, call: Call, grad: Tensor) -> None:
        call.grad_output = grad.detach()
        if self.defer:
            self.ready.append((e, call))
        else:
            self._consume(e, call)

    def _consume(self, e: _Entry, call: Call) -> None:
        assert self.consume is not None
        call.args = tuple(a.detach() if isinstance(a, Tensor) else a for a in call.args)
        call.params = {k: v.detach() for k, v in call.params.items()}
        self.consume(e, call)
        call.grad_output = None
        if not self.retain:  # this call is done: its activations go with the graph
            call.args, call.kwargs, call.extras = (), {}, {}

    def backward(
        self, scalar: Tensor, consume: Consume, retain_graph: bool = False, defer: bool = False
    ) -> None:
        """Backpropagates ``scalar`` to the module outputs and calls ``consume(entry, call)``
        with ``call.grad_output`` set for each call whose output it reaches (never for the
        others: their gradient is zero), streamed or ``defer``-red (see the class)."""
        self.consume, self.retain, self.defer = consume, retain_graph, defer
        try:
            torch.autograd.grad(scalar, [self.anchor], retain_graph=retain_graph, allow_unused=True)
            for e, call in self.ready:
                self._consume(e, call)
        finally:
            self.consume = None
            self.ready.clear()
            if not retain_graph:
                self.close()

    def close(self) -> None:
        """Drops every reference into the graph (the taps hold consumers that hold calls)."""
        for e in self.entries:
            e.calls.clear()
        self.logits = self.anchor = None  # type: ignore[assignment]


def _captured(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss: LossSpec,
    fit: bool,
    consume: Consume,
    defer: bool = False,
) -> None:
    """The hooks path: forward with capture, ``Σ_n ℓ_n``, one backward pass handing every call
    to ``consume`` with its ``grad_output`` (streamed, or ``defer``-red: see :class:`_Capture`).
    With ``fit`` (see :func:`_check`) the forward is also the probe: an error from inside the
    model says that ``x`` does not fit it, and ``y`` is checked against these logits
    (:func:`_fits`) -- no separate probe forward."""
    cap = (
        _probe(lambda: _Capture(model, params, x), _misfit_x(x))
        if fit
        else _Capture(model, params, x)
    )
    try:
        if fit:
            _fits(cap.logits, x, y, loss)
        elif loss == "cross_entropy" and not y.is_floating_point():
            _check_labels(y, cap.logits.shape[-1])
        total = resolve_loss(loss)(cap.logits, y).sum()
    except BaseException:
        cap.close()
        raise
    cap.backward(total, consume, defer=defer)


def _add_grads(res: dict[str, Tensor], e: _Entry, call: Call) -> None:
    """``res[full name] +=`` the call's per-sample gradients ``[N, *shape]``."""
    for local, g in e.rule.grads(e.module, call, e.names).items():
        name = e.full[local]
        res[name] = res[name] + g if name in res else g


def _method(model: nn.Module, method: Method) -> str:
    if method not in ("auto", "hooks", "func"):
        raise ValueError(f"method={method!r}: expected 'auto', 'hooks' or 'func'")
    if uses_batch_statistics(model):
        if method == "hooks":
            raise ValueError(
                "method='hooks' cannot be used: a BatchNorm uses batch statistics, so samples "
                "interact; use method='auto' or 'func' (exact cross-sample terms)"
            )
        return "exact"
    if method == "auto" and torch.compiler.is_compiling():
        return "func"  # forward hooks cannot be registered inside a traced graph
    return "hooks" if method == "auto" else "func"


# ---- torch.func paths ----------------------------------------------------------------------------
def _func_grad_chunks(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    exact: bool,
    chunk: int,
) -> Iterator[tuple[int, dict[str, Tensor]]]:
    """Yields ``(start, {name: [c, *shape]})``: per-sample gradients of samples
    ``start .. start + c`` (``vmap(grad)``, or rows of the loss-vector Jacobian if ``exact``)."""
    p = {k: v.detach() for k, v in params.items()}
    bufs = _buffers(model)
    n = x.shape[0]
    if exact:

        def losses(q: dict[str, Tensor]) -> Tensor:
            # fresh buffer copies inside the transform: BatchNorm updates them in place
            b = {k: v.clone() for k, v in bufs.items()}
            return loss_fn(functional_call(model, {**q, **b}, (x,)), y)

        pull = torch.func.vjp(losses, p)[1]
        eye = torch.eye(n, dtype=next(iter(p.values())).dtype, device=x.device)
        for s in range(0, n, chunk):
            (g,) = torch.func.vmap(pull)(eye[s : s + chunk])
            yield s, g
        return

    def one(q: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**q, **bufs}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    per = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    for s in range(0, n, chunk):
        yield s, per(p, x[s : s + chunk], y[s : s + chunk])


def _default_chunk(params: Mapping[str, Tensor], n: int) -> int:
    total = sum(v.numel() for v in params.values())
    return max(1, min(max(n, 1), (1 << 24) // max(total, 1)))


# ---- public API ----------------------------------------------------------------------------------
def per_sample_grads(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss: LossSpec = "cross_entropy",
    *,
    method: Method = "auto",
) -> dict[str, Tensor]:
    """Per-sample gradients ``{name: [N, *shape]}`` of each sample's own loss.

    ``G_n = dℓ_n/dθ`` with ``ℓ_n = loss(model(x; θ), y)[n]`` (see the module docstring for what
    this means when BatchNorm uses batch statistics). Units: loss per unit parameter.

    Args:
        model: the network; evaluated functionally at ``params`` (its own values elsewhere).
        params: ``{name: Tensor}`` subset of ``model.named_parameters()`` to differentiate.
        x: inputs ``[N, ...]``; y: targets ``[N, ...]``.
        loss: ``"cross_entropy"``, ``"mse"`` or ``callable(logits, y) -> [N]``.
        method: ``"auto"`` | ``"hooks"`` | ``"func"`` (module docstring).

    Returns:
        ``{name: [N, *shape]}`` (detached), same dtype as the parameters.
    """
    fit = _check(model, params, x, y, loss)
    loss_fn = resolve_loss(loss)
    how = _method(model, method)
    if fit and how != "hooks":
        _check_fit(model, params, x, y, loss)
    n = x.shape[0]
    if how != "hooks" or n == 0:
        if n == 0:
            return {k: v.new_zeros(0, *v.shape) for k, v in params.items()}
        out = {k: v.new_empty(n, *v.shape) for k, v in params.items()}
        chunk = _default_chunk(params, n)
        for s, gs in _func_grad_chunks(model, params, x, y, loss_fn, how == "exact", chunk):
            for k in out:
                out[k][s : s + gs[k].shape[0]] = gs[k]
        return out
    res: dict[str, Tensor] = {}
    _captured(model, params, x, y, loss, fit, partial(_add_grads, res), defer=True)
    return {k: res[k] if k in res else v.new_zeros(n, *v.shape) for k, v in params.items()}


def _reduce(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss: LossSpec,
    method: Method,
    vectors: Mapping[str, Tensor] | None,
) -> Tensor:
    fit = _check(model, params, x, y, loss)
    loss_fn = resolve_loss(loss)
    m = _check_vectors(params, vectors) if vectors is not None else 0
    how = _method(model, method)
    if fit and how != "hooks":
        _check_fit(model, params, x, y, loss)
    n = x.shape[0]
    ref = next(iter(params.values()))
    shape = (n, m) if vectors is not None else (n,)
    out = ref.new_zeros(shape)
    if n == 0:
        return out
    if how != "hooks":
        chunk = _default_chunk(params, n)
        for s, gs in _func_grad_chunks(model, params, x, y, loss_fn, how == "exact", chunk):
            for k, gk in gs.items():
                flat = gk.reshape(gk.shape[0], -1)
                if vectors is None:
                    out[s : s + flat.shape[0]] += flat.pow(2).sum(1)
                else:
                    v = vectors[k].reshape(m, -1).to(flat.dtype)
                    out[s : s + flat.shape[0]] += flat @ v.T
        return out
    shared: dict[str, Tensor] = {}  # per-sample gradients of modules called more than once

    def consume(e: _Entry, c: Call) -> None:
        if len(e.calls) > 1:  # a shared module: its per-sample gradients add before reducing
            _add_grads(shared, e, c)
        elif vectors is None:
            out.add_(e.rule.sqnorms(e.module, c, e.names))
        else:
            local_v = {local: vectors[full] for local, full in e.full.items()}
            out.add_(e.rule.dots(e.module, c, e.names, local_v))

    _captured(model, params, x, y, loss, fit, consume)
    for name, g in shared.items():
        flat = g.reshape(n, -1)
        out += flat.pow(2).sum(1) if vectors is None else flat @ vectors[name].reshape(m, -1).T
    return out


def per_sample_grad_norms(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss: LossSpec = "cross_entropy",
    *,
    method: Method = "auto",
) -> Tensor:
    """Squared norms ``[N]``: ``out[n] = Σ_p ‖G_n[p]‖²`` of the per-sample gradients of
    :func:`per_sample_grads`, computed per layer from (activations, grad_outputs) without
    forming ``[N, P]`` (Gram or tiled form per layer, see :mod:`metafluence.psg.rules`).
    Units: (loss per unit parameter)². (The ``func``/batch-statistics paths form the
    gradients of a chunk of samples at a time.)"""
    return _reduce(model, params, x, y, loss, method, None)


def per_sample_grad_dots(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    vectors: Mapping[str, Tensor],
    loss: LossSpec = "cross_entropy",
    *,
    method: Method = "auto",
) -> Tensor:
    """Dot products ``[N, m]``: ``out[n, j] = Σ_p ⟨G_n[p], vectors[p][j]⟩`` with ``vectors``
    ``{name: [m, *shape]}`` (one entry per name in ``params``), without forming ``[N, P]``
    (for Linear ``⟨G_n, V⟩ = Σ_t g_tᵀ V a_t`` by the fused op; see
    :mod:`metafluence.psg.rules`)."""
    if vectors is None:
        raise TypeError("vectors must be a dict {name: Tensor [m, *shape]}")
    return _reduce(model, params, x, y, loss, method, vectors)


def logit_jacobians(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    *,
    flat: bool = False,
    method: Method = "auto",
) -> dict[str, Tensor] | Tensor:
    """Per-sample Jacobians of the logits: ``J[n, c] = ∂ logits[n, c] / ∂θ``.

    Returns ``{name: [N, C, *shape]}``, or with ``flat=True`` one tensor ``[N, C, P]`` (parameters
    concatenated in the order of ``params``), e.g. to build ``U`` of width ``N·C`` for the
    Woodbury inner solve. ``logits`` must be ``[N, C]``.

    ``"hooks"``: one forward with capture and ``C`` backward passes of ``Σ_n logits[n, c]`` to
    the module outputs, each turned into per-sample gradients by the registry rules.
    ``"func"``: ``vmap(jacrev)`` per sample. With batch-statistics BatchNorm: rows of the full
    Jacobian of all logits (cross-sample terms included, as in :func:`per_sample_grads`).
    """
    _check(model, params, x)
    how = _method(model, method)
    n = x.shape[0]
    if how == "hooks" and n > 0:
        cap = _Capture(model, params, x)
        c_dim = cap.logits.shape[1] if cap.logits.dim() == 2 else -1
        per_c: list[dict[str, Tensor]] = [{} for _ in range(max(c_dim, 0))]
        try:
            if c_dim < 0:
                raise ValueError(f"logits have shape {tuple(cap.logits.shape)}, expected [N, C]")
            for c, res in enumerate(per_c):
                cap.backward(
                    cap.logits[:, c].sum(), partial(_add_grads, res), c + 1 < c_dim, defer=True
                )
        finally:
            cap.close()
        jac = {
            k: torch.stack([r[k] if k in r else v.new_zeros(n, *v.shape) for r in per_c], 1)
            for k, v in params.items()
        }
    else:
        jac = _logit_jacobians_func(model, params, x, exact=how == "exact")
    if not flat:
        return jac
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], dim=2)


def _logit_jacobians_func(
    model: nn.Module, params: Mapping[str, Tensor], x: Tensor, exact: bool
) -> dict[str, Tensor]:
    p = {k: v.detach() for k, v in params.items()}
    bufs = _buffers(model)
    if exact:

        def all_logits(q: dict[str, Tensor]) -> Tensor:
            b = {k: v.clone() for k, v in bufs.items()}
            return functional_call(model, {**q, **b}, (x,))

        jac = torch.func.jacrev(all_logits)(p)  # {name: [N, C, N?]} -> rows n of sample n
        out = {}
        for k, j in jac.items():
            out[k] = j  # [N, C, *shape]: d logits[n, c] / d θ (all samples' effect included)
        return out

    def one(q: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, {**q, **bufs}, (xi.unsqueeze(0),)).squeeze(0)

    res: dict[str, Tensor] = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(p, x)
    return res
