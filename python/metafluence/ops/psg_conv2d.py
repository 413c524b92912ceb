"""``psg_conv2d``, ``psg_conv2d_sqnorm``, ``psg_conv2d_dot``: per-sample weight gradients of a
2-D convolution, and their squared norms and dot products with ``m`` vectors, fused.

With ``x`` the activations ``[N, C, H, W]`` (zero padding), ``g`` the grad_outputs
``[N, O, Ho, Wo]`` and ``Og = O/groups``, ``Cg = C/groups``::

    G_n[o, c, i, j] = Σ_{y,x} g[n, o, y, x] · x[n, ⌊o/Og⌋·Cg + c, y·sh + i·dh − ph,
                                                                x·sw + j·dw − pw]
    psg_conv2d:        out[n]    = G_n                    [N, O, Cg, kh, kw]
    psg_conv2d_sqnorm: out[n]    = ‖G_n‖²_F               [N]
    psg_conv2d_dot:    out[n, j] = ⟨G_n, vectors[j]⟩_F    [N, m]

Every backend computes this as an implicit GEMM: the unfolded input ``[N, Cg·kh·kw, T]`` is
never formed, and the reductions never write ``G`` (``[N, P]``) to memory.

Backends (see :mod:`metafluence.ops._dispatch`): ``native`` (C++ on CPU, CUDA on GPU),
``triton`` and ``reference`` (:mod:`metafluence.reference`, via ``F.unfold``). All are
differentiable in the tensor inputs (the backward of the reductions forms ``G``).
Other padding modes (``reflect``, ``circular``, ...) and asymmetric padding: pad the input
first (:func:`torch.nn.functional.pad`) and pass ``padding=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input

from .. import _loader
from ..reference import psg as _ref_psg
from ..reference import psg_reduce as _ref_reduce
from . import _dispatch
from ._psg_reduce_common import check_tensor_pair, check_vectors

__all__ = ["Conv2dGeometry", "psg_conv2d", "psg_conv2d_dot", "psg_conv2d_sqnorm"]

OPS = ("psg_conv2d", "psg_conv2d_sqnorm", "psg_conv2d_dot")
DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

CHECKS = _dispatch.register_ops(OPS, DTYPES)

Pair = tuple[int, int]
#: ``(kernel_size, stride, padding, dilation, groups)`` as the ops take them
Conv2dGeometry = tuple[Pair, Pair, Pair, Pair, int]


# ---- validation ----------------------------------------------------------------------------
def _pair(op: str, name: str, v: Any, lo: int) -> Pair:
    if isinstance(v, str):
        raise TypeError(
            f"{op}: {name}={v!r} is not supported: the op takes explicit zero padding; pad the "
            "input yourself (F.pad, any mode) and pass padding=0, or use "
            "metafluence.psg.rules.conv2d_geometry(module, x) for an nn.Conv2d"
        )
    vals = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, Sequence) else None
    if (
        vals is None
        or len(vals) != 2
        or not all(isinstance(e, int) and not isinstance(e, bool) for e in vals)
    ):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints (h, w), got {v!r}")
    if min(vals) < lo:
        raise ValueError(f"{op}: {name} = {v!r}, expected entries >= {lo}")
    return (int(vals[0]), int(vals[1]))


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one axis (0 if the kernel does not fit)."""
    span = size + 2 * p - d * (k - 1) - 1
    return span // s + 1 if span >= 0 else 0


def validate(
    op: str,
    activations: Any,
    grad_outputs: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    groups: Any,
) -> Conv2dGeometry:
    """Check the inputs of the three ops (messages name the argument); the normalised geometry."""
    check_tensor_pair(op, activations, grad_outputs, "[N, C, H, W]", "[N, O, Ho, Wo]")
    ks = _pair(op, "kernel_size", kernel_size, 1)
    st = _pair(op, "stride", stride, 1)
    pd = _pair(op, "padding", padding, 0)
    dl = _pair(op, "dilation", dilation, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{op}: groups = {groups!r}, expected an int >= 1")
    n, c, h, w = activations.shape
    gn, o, ho, wo = grad_outputs.shape
    if gn != n:
        raise ValueError(
            f"{op}: activations {list(activations.shape)} and grad_outputs "
            f"{list(grad_outputs.shape)} must agree on N"
        )
    if c % groups or o % groups:
        raise ValueError(
            f"{op}: groups = {groups} must divide the {c} channels of activations and the {o} "
            "channels of grad_outputs"
        )
    want = (out_size(h, ks[0], st[0], pd[0], dl[0]), out_size(w, ks[1], st[1], pd[1], dl[1]))
    if (ho, wo) != want:
        raise ValueError(
            f"{op}: grad_outputs {list(grad_outputs.shape)} has spatial size {[ho, wo]}, expected "
            f"{list(want)} for activations {list(activations.shape)}, kernel_size {ks}, "
            f"stride {st}, padding {pd}, dilation {dl}"
        )
    return ks, st, pd, dl, groups


def validate_vectors(
    op: str, activations: torch.Tensor, grad_outputs: torch.Tensor, v: Any, geom: Conv2dGeometry
) -> None:
    ks, groups = geom[0], geom[4]
    want = (grad_outputs.shape[1], activations.shape[1] // groups, *ks)
    check_vectors(op, v, want, "[m, O, C/groups, kh, kw]", activations)


# ---- backward formulas ---------------------------------------------------------------------
def _grads_from_dG(
    d_g: torch.Tensor, activations: torch.Tensor, grad_outputs: torch.Tensor, geom: Conv2dGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Given ``dG [N, O, Cg, kh, kw]`` (the gradient w.r.t. ``G``): ``(d activations,
    d grad_outputs)``. ``G`` is bilinear: ``d x`` is the input gradient and ``d g`` the output of
    a convolution whose weight is ``dG_n`` for sample ``n`` (one grouped convolution with
    ``N·groups`` groups)."""
    ks, st, pd, dl, groups = geom
    n, c, h, w = activations.shape
    o = grad_outputs.shape[1]
    if n == 0:
        return torch.zeros_like(activations), torch.zeros_like(grad_outputs)
    weight = d_g.reshape(n * o, c // groups, *ks)
    g1 = grad_outputs.reshape(1, n * o, *grad_outputs.shape[2:])
    d_x = conv2d_input(
        (1, n * c, h, w), weight, g1, stride=st, padding=pd, dilation=dl, groups=n * groups
    )
    d_gout = F.conv2d(
        activations.reshape(1, n * c, h, w), weight, None, st, pd, dl, n * groups
    ).reshape(grad_outputs.shape)
    return d_x.reshape(activations.shape), d_gout


def _per_sample(a: torch.Tensor, g: torch.Tensor, geom: Conv2dGeometry) -> torch.Tensor:
    return _ref_psg.psg_conv2d(a, g, *geom)


def _psg_backward(
    grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, geom: Conv2dGeometry
) -> tuple[torch.Tensor, ...]:
    return _grads_from_dG(grad, a, g, geom)


def _sqnorm_backward(
    grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, geom: Conv2dGeometry
) -> tuple[torch.Tensor, ...]:
    """``out[n] = ‖G_n‖²``: ``dG_n = 2 grad[n] G_n``."""
    d_g = 2.0 * grad[:, None, None, None, None] * _per_sample(a, g, geom)
    return _grads_from_dG(d_g, a, g, geom)


def _dot_backward(
    grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, v: torch.Tensor, geom: Conv2dGeometry
) -> tuple[torch.Tensor, ...]:
    """``out[n, j] = ⟨G_n, v_j⟩``: ``dG_n = Σ_j grad[n, j] v_j``, ``d v_j = Σ_n grad[n, j] G_n``."""
    d_g = (grad @ v.flatten(1)).reshape(a.shape[0], *v.shape[1:])
    d_a, d_gout = _grads_from_dG(d_g, a, g, geom)
    d_v = (grad.T @ _per_sample(a, g, geom).flatten(1)).reshape(v.shape)
    return d_a, d_gout, d_v


_BACKWARD: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {
    "psg_conv2d": _psg_backward,
    "psg_conv2d_sqnorm": _sqnorm_backward,
    "psg_conv2d_dot": _dot_backward,
}
_N_TENSORS = {"psg_conv2d": 2, "psg_conv2d_sqnorm": 2, "psg_conv2d_dot": 3}


def _out_shape(op: str, a: torch.Tensor, g: torch.Tensor, rest: tuple[Any, ...]) -> list[Any]:
    if op == "psg_conv2d":
        ks, groups = rest[0], rest[4]
        return [a.shape[0], g.shape[1], a.shape[1] // groups, ks[0], ks[1]]
    if op == "psg_conv2d_sqnorm":
        return [a.shape[0]]
    return [a.shape[0], rest[0].shape[0]]


# ---- registrations on the compiled ops (fake impls, autograd formulas) -----------------------
def _register_native() -> bool:
    if not _loader.STATE.loaded or not all(hasattr(torch.ops.metafluence, op) for op in OPS):
        return False
    for op in OPS:
        nt = _N_TENSORS[op]

        def fake(a: torch.Tensor, g: torch.Tensor, *rest: Any, op: str = op) -> torch.Tensor:
            torch._check(a.dim() == 4, lambda: "activations must be [N, C, H, W]")
            torch._check(g.dim() == 4, lambda: "grad_outputs must be [N, O, Ho, Wo]")
            torch._check(a.shape[0] == g.shape[0], lambda: "N must agree")
            torch._check(a.dtype == g.dtype, lambda: "dtypes must agree")
            return a.new_empty(_out_shape(op, a, g, rest))

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any, nt: int = nt) -> None:
            ctx.save_for_backward(*inputs[:nt])
            ctx.geom = tuple(tuple(v) if isinstance(v, list) else v for v in inputs[nt:])

        def backward(ctx: Any, grad: torch.Tensor, op: str = op) -> tuple[Any, ...]:
            grads = _BACKWARD[op](grad, *ctx.saved_tensors, ctx.geom)
            return (*grads, None, None, None, None, None)

        qualname = f"metafluence::{op}"
        torch.library.register_fake(qualname)(fake)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    return True


NATIVE_REGISTERED = _register_native()


class _Triton(torch.autograd.Function):
    """Triton forward (kernels in :mod:`metafluence.kernels.triton.psg_conv2d`), same backward."""

    @staticmethod
    def forward(ctx: Any, op: str, geom: Conv2dGeometry, *tensors: torch.Tensor) -> torch.Tensor:
        from ..kernels.triton import psg_conv2d as kernels

        ctx.op, ctx.geom = op, geom
        ctx.save_for_backward(*tensors)
        out: torch.Tensor = getattr(kernels, op)(*tensors, *geom)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (None, None, *_BACKWARD[ctx.op](grad, *ctx.saved_tensors, ctx.geom))


def _run(
    op: str, tensors: tuple[torch.Tensor, ...], geom: Conv2dGeometry, backend: str | None
) -> torch.Tensor:
    a = tensors[0]
    chosen = _dispatch.select_backend(op, CHECKS[op], a.device, a.dtype, backend=backend)
    if chosen == "native":
        native = getattr(torch.ops.metafluence, op)
        out: torch.Tensor = native(*(t.contiguous() for t in tensors), *geom)
        return out
    if chosen == "triton":
        out = _Triton.apply(op, geom, *tensors)
        assert isinstance(out, torch.Tensor)
        return out
    reference = getattr(_ref_reduce if op != "psg_conv2d" else _ref_psg, op)
    ref_out: torch.Tensor = reference(*tensors, *geom)
    return ref_out


# ---- entry points ----------------------------------------------------------------------------
def psg_conv2d(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sample weight gradients of a 2-D convolution (module docstring for the formula).

    Args:
        activations: layer inputs ``[N, C, H, W]``.
        grad_outputs: gradients of each sample's loss w.r.t. the layer outputs
            ``[N, O, Ho, Wo]``, same dtype and device.
        kernel_size, stride, padding, dilation: ints or ``(h, w)`` pairs as in ``nn.Conv2d``
            (zero padding only; pad the input yourself for other modes).
        groups: as in ``nn.Conv2d``.
        backend: ``"native"``, ``"triton"``, ``"reference"`` (alias ``"torch"``) or ``None``
            (``METAFLUENCE_BACKEND``, else automatic).

    Returns:
        ``[N, O, C/groups, kh, kw]`` in loss per unit weight, dtype of the inputs.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices or geometry (the message names the
            argument).
        BackendUnavailableError: the requested backend cannot run here.
    """
    op = "psg_conv2d"
    geom = validate(op, activations, grad_outputs, kernel_size, stride, padding, dilation, groups)
    return _run(op, (activations, grad_outputs), geom, backend)


def psg_conv2d_sqnorm(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sample squared Frobenius norms ``‖G_n‖²_F`` of a convolution's weight gradients;
    ``[N, P]`` is never formed (forward). Arguments as :func:`psg_conv2d`.

    Returns:
        ``[N]`` in (loss per unit weight)².
    """
    op = "psg_conv2d_sqnorm"
    geom = validate(op, activations, grad_outputs, kernel_size, stride, padding, dilation, groups)
    return _run(op, (activations, grad_outputs), geom, backend)


def psg_conv2d_dot(
    activations: torch.Tensor,
    grad_outputs: torch.Tensor,
    vectors: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sample dot products ``⟨G_n, vectors[j]⟩_F`` of a convolution's weight gradients with
    ``m`` vectors ``[m, O, C/groups, kh, kw]``; ``[N, P]`` is never formed (forward). Other
    arguments as :func:`psg_conv2d`.

    Returns:
        ``[N, m]`` in loss per unit weight times the units of ``vectors``.
    """
    op = "psg_conv2d_dot"
    geom = validate(op, activations, grad_outputs, kernel_size, stride, padding, dilation, groups)
    validate_vectors(op, activations, grad_outputs, vectors, geom)
    return _run(op, (activations, grad_outputs, vectors), geom, backend)
