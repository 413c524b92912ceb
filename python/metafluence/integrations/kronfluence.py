"""kronfluence's per-module hot spots on metafluence's per-sample-gradient kernels.

kronfluence (``TrackedLinear``) computes, for a linear layer with input activations
``a [B, ..., in]`` and output gradients ``g [B, ..., out]`` (``...`` = tokens, any number of
dims):

* per-sample gradients ``G_b = Σ_t g_btᵀ a_bt``: ``[B, out, in]`` (``"b...i,b...o->bio"``);
* pairwise scores ``⟨P_q, G_b⟩``: ``[Q, B]`` for preconditioned query gradients ``P``
  ``[Q, out, in]``
  or a low-rank pair ``(L [Q, out, r], R [Q, r, in])``;
* self scores ``⟨P_b, G_b⟩``: ``[B]``.

``TrackedConv2d`` does the same with ``in = C·kh·kw`` (the unfolded input, which kronfluence forms
with ``F.unfold``) and ``t`` the output positions.

The functions here take and return kronfluence's shapes and run on
:func:`metafluence.ops.psg_linear` / :func:`~metafluence.ops.psg_linear_dot` and, for
convolutions, :func:`metafluence.ops.psg_conv2d` / :func:`~metafluence.ops.psg_conv2d_dot`
(native C++ / CUDA / Triton kernels; pairwise scores never form ``[B, out, in]``, and the conv
functions never form the unfolded input). :func:`use_metafluence_kernels` swaps them into
kronfluence's ``TrackedLinear`` and ``TrackedConv2d`` for the duration of a ``with`` block
(per-token scores, dtypes other than float32 / float64, and convolutions with ``groups > 1`` or a
padding mode other than zeros -- which kronfluence treats its own way -- keep kronfluence's own
code).

Bias: kronfluence appends a column of ones to ``a`` when the layer has a bias; these functions
take ``a`` as given (pass the augmented activations), and the patched methods augment it exactly
as kronfluence does.

This module does not import kronfluence (only :func:`use_metafluence_kernels` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import ops
from ..psg.rules import conv2d_geometry

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "conv2d_pairwise_score",
    "conv2d_per_sample_gradient",
    "conv2d_self_score",
    "pairwise_score",
    "per_sample_gradient",
    "self_score",
    "use_metafluence_kernels",
]

_DTYPES = (torch.float32, torch.float64)

#: the paths each function can take: metafluence's compiled kernels (``"native"``; Triton on
#: CUDA), their pure-PyTorch twins (``"reference"``), or kronfluence's formula contracted in the
#: order with the fewest multiply-adds by plain matmuls (``"einsum"``; kronfluence searches
#: that order with ``opt_einsum`` and runs ``torch.einsum``)
BACKENDS = ("native", "reference", "einsum")

#: the default path of each (layer, function): the fastest at kronfluence's shapes on a CPU
#: (``benchmarks/bench_kronfluence.py`` → ``benchmarks/results/kronfluence.csv``, 1 thread,
#: interleaved rounds): for linear layers ``"einsum"`` (0.15–1.02× kronfluence's own time; the
#: native kernels took 1.0–8.4×), for convolutions ``"native"`` (0.25–0.57×)
DEFAULT_BACKEND: dict[tuple[str, str], str] = {
    ("linear", "per_sample_gradient"): "einsum",
    ("linear", "pairwise_score"): "einsum",
    ("linear", "self_score"): "einsum",
    ("conv2d", "per_sample_gradient"): "native",
    ("conv2d", "pairwise_score"): "native",
    ("conv2d", "self_score"): "native",
}


def _backend(layer: str, fn: str, backend: str | None) -> str:
    if backend is None:
        return DEFAULT_BACKEND[(layer, fn)]
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS} or None")
    return backend


def _ntd(x: Tensor) -> Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` (``T`` = product of the middle dims, 1 if none)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _low_rank(pg: Tensor | list[Tensor] | tuple[Tensor, Tensor]) -> Tensor:
    if isinstance(pg, (list, tuple)):
        left, right = pg
        return torch.bmm(left, right)
    return pg


def per_sample_gradient(
    input_activation: Tensor, output_gradient: Tensor, *, backend: str | None = None
) -> Tensor:
    """``[B, out, in]`` per-sample weight gradients ``G_b = Σ_t g_btᵀ a_bt`` (kronfluence's
    ``"b...i,b...o->bio"``); ``backend`` one of :data:`BACKENDS` (None: :data:`DEFAULT_BACKEND`).
    """
    a, g = _ntd(input_activation), _ntd(output_gradient)
    path = _backend("linear", "per_sample_gradient", backend)
    if path == "einsum":
        return torch.bmm(g.transpose(1, 2), a)
    return ops.psg_linear(a, g, backend=path)


def pairwise_score(
    preconditioned_gradient: Tensor | list[Tensor] | tuple[Tensor, Tensor],
    input_activation: Tensor,
    output_gradient: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """``[Q, B]`` scores ``⟨P_q, G_b⟩ = Σ_t g_btᵀ P_q a_bt`` for ``P`` ``[Q, out, in]`` or a
    low-rank pair ``(L [Q, out, r], R [Q, r, in])`` (kronfluence's ``"qio,b...i,b...o->qb"`` /
    ``"qik,qko,b...i,b...o->qb"``); the ``"native"`` path never forms ``G [B, out, in]``."""
    a, g = _ntd(input_activation), _ntd(output_gradient)
    path = _backend("linear", "pairwise_score", backend)
    if path == "einsum":
        return _pairwise_einsum(preconditioned_gradient, a, g)
    pg = _low_rank(preconditioned_gradient).to(a.dtype)
    return ops.psg_linear_dot(a, g, pg, backend=path).T


def _pairwise_einsum(
    pg: Tensor | list[Tensor] | tuple[Tensor, Tensor], a: Tensor, g: Tensor
) -> Tensor:
    """``Σ_t g_btᵀ P_q a_bt`` ``[Q, B]`` for ``a [B, T, in]``, ``g [B, T, out]``, contracted in
    the order with the fewest multiply-adds (what kronfluence's ``opt_einsum`` path search finds,
    without its per-call planning): projecting the inputs through ``P`` (``Q·B·T·out·in``; for a
    low-rank ``P = L R`` both sides onto the rank, ``Q·B·T·r·(out+in)``) or forming ``G_b`` first
    (``B·T·out·in + Q·B·out·in``)."""
    B, T, n_in = a.shape
    n_out = g.shape[-1]
    g_first = B * T * n_out * n_in
    if isinstance(pg, (list, tuple)):
        left, right = (t.to(a.dtype) for t in pg)
        Q, r = left.shape[0], left.shape[-1]
        if Q * B * T * r * (n_out + n_in) <= g_first + Q * B * n_out * n_in:
            gl = torch.einsum("bto,qor->qbtr", g, left)
            ar = torch.einsum("bti,qri->qbtr", a, right)
            return (gl * ar).sum((2, 3))
        pg = torch.bmm(left, right)
    pg = pg.to(a.dtype)
    Q = pg.shape[0]
    if Q * T <= T + Q:  # projecting is cheaper (T = 1, or a single query)
        y = (pg.reshape(Q * n_out, n_in) @ a.reshape(B * T, n_in).T).view(Q, n_out, B, T)
        return torch.einsum("qobt,bto->qb", y, g)
    G = torch.bmm(g.transpose(1, 2), a)  # [B, out, in]
    return pg.reshape(Q, -1) @ G.reshape(B, -1).T


def self_score(
    preconditioned_gradient: Tensor,
    input_activation: Tensor,
    output_gradient: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """``[B]`` scores ``⟨P_b, G_b⟩`` (kronfluence's ``"bio,b...i,b...o->b"``)."""
    path = _backend("linear", "self_score", backend)
    if path == "einsum":  # P_b a_bt first ([B, out, T]): never forms G
        a, g = _ntd(input_activation), _ntd(output_gradient)
        y = torch.bmm(preconditioned_gradient.to(a.dtype), a.transpose(1, 2))
        return (y * g.transpose(1, 2)).sum((1, 2))
    G = per_sample_gradient(input_activation, output_gradient, backend=path)
    return (preconditioned_gradient.to(G.dtype) * G).sum(dim=(1, 2))


def _unfold(module: nn.Conv2d, x: Tensor, geom: ops.Conv2dGeometry) -> Tensor:
    """``[B, L, C·kh·kw]`` patches of ``x`` (kronfluence's ``extract_patches``), ``groups=1``."""
    kernel, stride, padding, dilation, _ = geom
    cols = nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def _conv_einsum_operands(
    module: nn.Conv2d, input_activation: Tensor, output_gradient: Tensor
) -> tuple[Tensor, Tensor]:
    """``(patches [B, L, C·kh·kw (+1)], g [B, L, O])`` for the einsum path."""
    if module.groups != 1:
        raise ValueError(f"backend='einsum' needs groups=1, got groups={module.groups}")
    x, geom = conv2d_geometry(module, input_activation)
    a = _unfold(module, x, geom)
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=-1)
    g = output_gradient.to(x.dtype).flatten(2).transpose(1, 2)
    return a, g


def conv2d_per_sample_gradient(
    module: nn.Conv2d,
    input_activation: Tensor,
    output_gradient: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """``[B, O, C·kh·kw (+1)]`` per-sample gradients of ``module`` in kronfluence's layout (the
    last column is the bias gradient ``Σ_t g`` when the module has a bias), for inputs
    ``[B, C, H, W]`` and output gradients ``[B, O, Ho, Wo]`` (:func:`metafluence.ops.psg_conv2d`
    on the ``"native"`` / ``"reference"`` paths, kronfluence's unfold + einsum on ``"einsum"``).
    """
    path = _backend("conv2d", "per_sample_gradient", backend)
    if path == "einsum":
        a, g = _conv_einsum_operands(module, input_activation, output_gradient)
        return torch.einsum("blo,bli->boi", g, a)
    x, geom = conv2d_geometry(module, input_activation)
    g = output_gradient.to(x.dtype)
    G = ops.psg_conv2d(x, g, *geom, backend=path).flatten(2)
    if module.bias is not None:
        G = torch.cat([G, g.sum((2, 3)).unsqueeze(-1)], dim=-1)
    return G


def conv2d_pairwise_score(
    module: nn.Conv2d,
    preconditioned_gradient: Tensor | list[Tensor] | tuple[Tensor, Tensor],
    input_activation: Tensor,
    output_gradient: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """``[Q, B]`` scores ``⟨P_q, G_b⟩`` for ``P`` ``[Q, O, C·kh·kw (+1)]`` (or a low-rank pair);
    the ``"native"`` path forms neither ``G`` nor the unfolded input
    (:func:`metafluence.ops.psg_conv2d_dot`)."""
    path = _backend("conv2d", "pairwise_score", backend)
    if path == "einsum":
        a, g = _conv_einsum_operands(module, input_activation, output_gradient)
        pg = _low_rank(preconditioned_gradient).to(a.dtype)
        return torch.einsum("qoi,blo,bli->qb", pg, g, a)
    x, geom = conv2d_geometry(module, input_activation)
    g = output_gradient.to(x.dtype)
    pg = _low_rank(preconditioned_gradient).to(x.dtype)
    k = x.shape[1] // module.groups * module.kernel_size[0] * module.kernel_size[1]
    pw = pg[..., :k].reshape(pg.shape[0], pg.shape[1], -1, *module.kernel_size)
    scores = ops.psg_conv2d_dot(x, g, pw.contiguous(), *geom, backend=path)
    if module.bias is not None:
        scores = scores + g.sum((2, 3)) @ pg[..., k].T
    return scores.T


def conv2d_self_score(
    module: nn.Conv2d,
    preconditioned_gradient: Tensor,
    input_activation: Tensor,
    output_gradient: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """``[B]`` scores ``⟨P_b, G_b⟩`` for ``P`` ``[B, O, C·kh·kw (+1)]``."""
    path = _backend("conv2d", "self_score", backend)
    G = conv2d_per_sample_gradient(module, input_activation, output_gradient, backend=path)
    return (preconditioned_gradient.to(G.dtype) * G).sum(dim=(1, 2))


_METHODS = {  # kronfluence's method -> our function name (the DEFAULT_BACKEND key)
    "compute_per_sample_gradient": "per_sample_gradient",
    "compute_pairwise_score": "pairwise_score",
    "compute_self_measurement_score": "self_score",
}


@contextlib.contextmanager
def use_metafluence_kernels(backend: str | None = None) -> Iterator[None]:
    """Within the block, kronfluence's ``TrackedLinear`` and ``TrackedConv2d`` compute per-sample
    gradients, pairwise and self scores with metafluence's functions (originals restored on
    exit).

    ``backend=None`` takes each method's :data:`DEFAULT_BACKEND`; ``"native"`` or
    ``"reference"`` force that path for every method. Per-token scores, dtypes other than
    float32 / float64 and convolutions with ``groups > 1`` or a padding mode other than zeros
    always keep kronfluence's code.
    """
    if backend is not None and backend not in ("native", "reference"):
        raise ValueError(f"backend={backend!r}: expected 'native', 'reference' or None")
    from kronfluence.module.conv2d import TrackedConv2d
    from kronfluence.module.linear import TrackedLinear

    def path(layer: str, method: str) -> str:
        return _backend(layer, _METHODS[method], backend)

    orig = {name: getattr(TrackedLinear, name) for name in _METHODS}
    lin = {name: path("linear", name) for name in _METHODS}

    def _ok(self, a: Tensor, g: Tensor) -> bool:
        return a.dtype in _DTYPES and g.dtype == a.dtype

    def compute_per_sample_gradient(self, input_activation, output_gradient):
        if not _ok(self, input_activation, output_gradient):
            return orig["compute_per_sample_gradient"](self, input_activation, output_gradient)
        a = self._flatten_input_activation(input_activation=input_activation)
        out = per_sample_gradient(a, output_gradient, backend=lin["compute_per_sample_gradient"])
        if self.per_sample_gradient_process_fnc is not None:
            out = self.per_sample_gradient_process_fnc(module_name=self.name, gradient=out)
        return out

    def compute_pairwise_score(self, preconditioned_gradient, input_activation, output_gradient):
        per_token = self.score_args.compute_per_token_scores and input_activation.dim() == 3
        if per_token or not _ok(self, input_activation, output_gradient):
            return orig["compute_pairwise_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        a = self._flatten_input_activation(input_activation=input_activation)
        return pairwise_score(
            preconditioned_gradient, a, output_gradient, backend=lin["compute_pairwise_score"]
        )

    def compute_self_measurement_score(
        self, preconditioned_gradient, input_activation, output_gradient
    ):
        if not _ok(self, input_activation, output_gradient):
            return orig["compute_self_measurement_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        a = self._flatten_input_activation(input_activation=input_activation)
        return self_score(
            preconditioned_gradient,
            a,
            output_gradient,
            backend=lin["compute_self_measurement_score"],
        )

    conv_orig = {name: getattr(TrackedConv2d, name) for name in _METHODS}
    conv = {name: path("conv2d", name) for name in _METHODS}

    def _conv_ok(self, a: Tensor, g: Tensor) -> bool:
        m = self.original_module
        return _ok(self, a, g) and m.groups == 1 and m.padding_mode == "zeros"

    def conv_per_sample_gradient(self, input_activation, output_gradient):
        if not _conv_ok(self, input_activation, output_gradient):
            return conv_orig["compute_per_sample_gradient"](self, input_activation, output_gradient)
        out = conv2d_per_sample_gradient(
            self.original_module,
            input_activation,
            output_gradient,
            backend=conv["compute_per_sample_gradient"],
        )
        if self.per_sample_gradient_process_fnc is not None:
            out = self.per_sample_gradient_process_fnc(module_name=self.name, gradient=out)
        return out

    def conv_pairwise_score(self, preconditioned_gradient, input_activation, output_gradient):
        if not _conv_ok(self, input_activation, output_gradient):
            return conv_orig["compute_pairwise_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        return conv2d_pairwise_score(
            self.original_module,
            preconditioned_gradient,
            input_activation,
            output_gradient,
            backend=conv["compute_pairwise_score"],
        )

    def conv_self_score(self, preconditioned_gradient, input_activation, output_gradient):
        if not _conv_ok(self, input_activation, output_gradient):
            return conv_orig["compute_self_measurement_score"](
                self, preconditioned_gradient, input_activation, output_gradient
            )
        return conv2d_self_score(
            self.original_module,
            preconditioned_gradient,
            input_activation,
            output_gradient,
            backend=conv["compute_self_measurement_score"],
        )

    patches = {
        TrackedLinear: (
            orig,
            lin,
            (compute_per_sample_gradient, compute_pairwise_score, compute_self_measurement_score),
        ),
        TrackedConv2d: (
            conv_orig,
            conv,
            (conv_per_sample_gradient, conv_pairwise_score, conv_self_score),
        ),
    }
    try:
        for cls, (names, _, fns) in patches.items():
            for name, fn in zip(names, fns, strict=True):
                setattr(cls, name, fn)
        yield
    finally:
        for cls, (names, _, _) in patches.items():
            for name, fn in names.items():
                setattr(cls, name, fn)
