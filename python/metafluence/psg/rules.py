"""Per-sample-gradient rules for the standard layers (registered on import).

Notation per module call: ``a`` = activations (input), ``g`` = grad_outputs (gradient of the
summed loss w.r.t. the output; row ``n`` is sample ``n``'s own output gradient), ``N`` samples.

* ``Linear`` (input ``[N, *, in]``, ``T`` = product of the middle dims):
  ``∂ℓ_n/∂W = Σ_t g_{nt} a_{nt}ᵀ``, ``∂ℓ_n/∂b = Σ_t g_{nt}``. Norms: Gram ("ghost") form
  ``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` when ``T(T+1)/2·(in+out) < T·in·out``, else the tiled op
  :func:`metafluence.ops.psg_linear_sqnorm`; dots: :func:`metafluence.ops.psg_linear_dot`
  (``Σ_t g_tᵀ V a_t``), per layer.
* ``Conv2d`` (any stride, padding, dilation, groups -- depthwise included --, padding mode,
  bias): ``∂ℓ_n/∂W[o,c,i,j] = Σ_{y,x} g[n,o,y,x] · x_pad[n, c, y·s + i·d, x·s + j·d]`` by the
  fused ops :func:`metafluence.ops.psg_conv2d` / :func:`~metafluence.ops.psg_conv2d_sqnorm` /
  :func:`~metafluence.ops.psg_conv2d_dot` (implicit GEMM: the unfolded input ``[N, C·k², T]``
  is never formed, and norms / dots never form ``[N, P]``); ``∂ℓ_n/∂b = Σ_{y,x} g``.
* ``GroupNorm`` / ``LayerNorm`` / ``BatchNorm`` with running statistics (eval mode): with
  ``x̂`` the normalised input, ``∂ℓ_n/∂γ = Σ_spatial g ⊙ x̂``, ``∂ℓ_n/∂β = Σ_spatial g``.
  BatchNorm with *batch* statistics couples samples and is handled by the exact path of
  :func:`metafluence.psg.per_sample_grads`, never by this rule.
* ``Embedding``: ``∂ℓ_n/∂E = Σ_t e_{idx_t} g_tᵀ`` (rows at ``padding_idx`` stay zero); norms by
  the index-Gram form ``Σ_{t,t'} [idx_t = idx_t'] g_t·g_t'`` and dots by gathering
  ``V[idx_t]`` -- neither forms ``[N, vocab, dim]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .registry import FUNC_RULE, Call, Rule, register_rule


def _use_gram(t: int, d_in: int, d_out: int) -> bool:
    return (t + 1) * 0.5 * (d_in + d_out) < d_in * d_out


def _gram_sqnorm(a: Tensor, g: Tensor) -> Tensor:
    """``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` for ``a [N, T, in]``, ``g [N, T, out]``."""
    if a.shape[1] == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))


# ---- Linear --------------------------------------------------------------------------------------
@register_rule(nn.Linear)
class LinearRule(Rule):
    @staticmethod
    def _flat(call: Call) -> tuple[Tensor, Tensor]:
        a, g = call.activations, call.grad_output
        assert g is not None
        n = a.shape[0]
        a3 = a.reshape(n, -1, a.shape[-1]) if a.dim() != 2 else a.unsqueeze(1)
        g3 = g.reshape(n, -1, g.shape[-1]) if g.dim() != 2 else g.unsqueeze(1)
        return a3.to(g3.dtype), g3

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        a, g = self._flat(call)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = ops.psg_linear(a, g) if a.shape[1] > 1 else g.mT @ a
        if "bias" in names:
            out["bias"] = g.sum(1)
        return out

    def sqnorms(self, module: nn.Module, call: Call, names: list[str]) -> Tensor:
        a, g = self._flat(call)
        out = g.new_zeros(g.shape[0])
        if "weight" in names:
            if _use_gram(a.shape[1], a.shape[2], g.shape[2]):
                out = out + _gram_sqnorm(a, g)
            else:
                out = out + ops.psg_linear_sqnorm(a, g)
        if "bias" in names:
            out = out + g.sum(1).pow(2).sum(1)
        return out

    def dots(
        self, module: nn.Module, call: Call, names: list[str], vectors: Mapping[str, Tensor]
    ) -> Tensor:
        a, g = self._flat(call)
        out: Tensor | None = None
        if "weight" in names:
            v = vectors["weight"]
            if a.shape[1] == 1:  # g_nᵀ V_j a_n via one matmul: [N, in] @ [in, m·out]
                va = (a[:, 0] @ v.reshape(-1, v.shape[-1]).T).view(a.shape[0], v.shape[0], -1)
                out = (va * g[:, 0, None, :]).sum(-1)
            else:
                out = ops.psg_linear_dot(a, g, v)
        if "bias" in names:
            d = g.sum(1) @ vectors["bias"].T
            out = d if out is None else out + d
        assert out is not None
        return out


# ---- Conv2d --------------------------------------------------------------------------------------
def conv2d_geometry(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, ops.Conv2dGeometry]:
    """The input as the conv ops take it and ``(kernel_size, stride, padding, dilation, groups)``.

    Zero padding given as numbers (or a symmetric ``'same'``) is passed to the ops, which never
    copy the input for it; other padding modes and an asymmetric ``'same'`` are applied to the
    input here (``F.pad``), with padding 0 for the ops.
    """
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    pad: tuple[int, int] = (0, 0)
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    elif isinstance(module.padding, str):
        if module.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            if th % 2 or tw % 2:
                x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
            else:
                pad = (th // 2, tw // 2)
    else:
        pad = (int(module.padding[0]), int(module.padding[1]))
    stride = (int(module.stride[0]), int(module.stride[1]))
    return x, ((kh, kw), stride, pad, (dh, dw), module.groups)


def conv2d_weight_psg(module: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``∂ℓ_n/∂W`` ``[N, O, C/groups, kh, kw]`` of ``module`` for inputs ``x`` and
    output gradients ``g`` (:func:`metafluence.ops.psg_conv2d`, implicit GEMM)."""
    xp, geom = conv2d_geometry(module, x)
    return ops.psg_conv2d(xp, g.to(xp.dtype), *geom)


@register_rule(nn.Conv2d)
class Conv2dRule(Rule):
    """Weight: the fused conv ops (any stride, padding, dilation, groups, padding mode); bias:
    ``Σ_{y,x} g``."""

    @staticmethod
    def _args(module: nn.Module, call: Call) -> tuple[Tensor, Tensor, ops.Conv2dGeometry] | None:
        assert isinstance(module, nn.Conv2d) and call.grad_output is not None
        if call.activations.dim() == 3:  # unbatched input: not per-sample
            return None
        x, geom = conv2d_geometry(module, call.activations)
        return x, call.grad_output.to(x.dtype), geom

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        args = self._args(module, call)
        if args is None:
            return FUNC_RULE.grads(module, call, names)
        x, g, geom = args
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = ops.psg_conv2d(x, g, *geom)
        if "bias" in names:
            out["bias"] = g.sum((2, 3))
        return out

    def sqnorms(self, module: nn.Module, call: Call, names: list[str]) -> Tensor:
        args = self._args(module, call)
        if args is None:
            return super().sqnorms(module, call, names)
        x, g, geom = args
        out = g.new_zeros(g.shape[0])
        if "weight" in names:
            out = out + ops.psg_conv2d_sqnorm(x, g, *geom)
        if "bias" in names:
            out = out + g.sum((2, 3)).pow(2).sum(1)
        return out

    def dots(
        self, module: nn.Module, call: Call, names: list[str], vectors: Mapping[str, Tensor]
    ) -> Tensor:
        args = self._args(module, call)
        if args is None:
            return super().dots(module, call, names, vectors)
        x, g, geom = args
        out: Tensor | None = None
        if "weight" in names:
            out = ops.psg_conv2d_dot(x, g, vectors["weight"].to(x.dtype), *geom)
        if "bias" in names:
            d = g.sum((2, 3)) @ vectors["bias"].to(g.dtype).T
            out = d if out is None else out + d
        assert out is not None
        return out


# ---- normalisation layers (affine parameters) ----------------------------------------------------
def _affine_grads(xhat: Tensor, g: Tensor, names: list[str], keep: list[int]) -> dict[str, Tensor]:
    """Sum ``g·x̂`` and ``g`` over every dim except 0 and ``keep``."""
    out: dict[str, Tensor] = {}
    if keep == [1] and g.dim() > 2:  # channel dim 1 (GroupNorm, BatchNorm): fused dot per row
        gf, xf = g.flatten(2), xhat.flatten(2)
        if "weight" in names:
            out["weight"] = torch.linalg.vecdot(gf, xf)
        if "bias" in names:
            out["bias"] = gf.sum(-1)
        return out
    dims = [d for d in range(1, g.dim()) if d not in keep]
    if "weight" in names:
        out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
    if "bias" in names:
        out["bias"] = g.sum(dims) if dims else g
    return out


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    """``∂ℓ_n/∂γ_c = Σ_s g·x̂``, ``∂ℓ_n/∂β_c = Σ_s g``. When the forward kept the group statistics
    (``μ``, ``1/σ`` per sample and group, saved by ``native_group_norm`` for its backward), both
    come from ATen's fused GroupNorm backward applied to the batch viewed as one sample with
    ``N·C`` channels in ``N·groups`` groups -- one pass over ``g`` and ``x``, no ``x̂`` formed --
    else ``x̂`` is recomputed."""

    def on_forward(self, module: nn.Module, call: Call) -> None:
        fn = call.output.grad_fn
        if fn is None or type(fn).__name__ != "NativeGroupNormBackward0":
            return
        mean, rstd = getattr(fn, "_saved_result1", None), getattr(fn, "_saved_result2", None)
        if isinstance(mean, Tensor) and isinstance(rstd, Tensor):
            call.extras["group_stats"] = (mean.detach(), rstd.detach())

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        assert isinstance(module, nn.GroupNorm) and call.grad_output is not None
        x, g = call.activations, call.grad_output
        stats = call.extras.get("group_stats")
        n, c = x.shape[:2]
        groups = module.num_groups
        if stats is None or x.dim() < 2 or stats[0].numel() != n * groups or n * c == 0:
            xhat = F.group_norm(x, groups, eps=module.eps)
            return _affine_grads(xhat, g, names, keep=[1])
        hw = x[0, 0].numel()
        mean, rstd = stats
        _, d_w, d_b = torch.ops.aten.native_group_norm_backward(
            g.reshape(1, n * c, hw),
            x.reshape(1, n * c, hw),
            mean.reshape(1, n * groups),
            rstd.reshape(1, n * groups),
            x.new_ones(1).expand(n * c),  # unused (no input gradient), but must be a tensor
            1,
            n * c,
            hw,
            n * groups,
            [False, "weight" in names, "bias" in names],
        )
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = d_w.view(n, c)
        if "bias" in names:
            out["bias"] = d_b.view(n, c)
        return out


@register_rule(nn.LayerNorm)
class LayerNormRule(Rule):
    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        assert isinstance(module, nn.LayerNorm) and call.grad_output is not None
        x = call.activations
        shape = tuple(module.normalized_shape)
        xhat = F.layer_norm(x, shape, eps=module.eps)
        g = call.grad_output
        keep = list(range(g.dim() - len(shape), g.dim()))
        if g.dim() == len(shape):  # unbatched input
            return FUNC_RULE.grads(module, call, names)
        return _affine_grads(xhat, g, names, keep=keep)


def batch_norm_uses_batch_stats(module: nn.Module) -> bool:
    """True if this BatchNorm normalises with the statistics of the current batch."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or module.running_mean is None
    )


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormEvalRule(Rule):
    """BatchNorm with running statistics (eval mode): ``x̂ = (x − μ_run)/√(σ²_run + ε)``."""

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        if batch_norm_uses_batch_stats(module):
            raise RuntimeError(
                "BatchNormEvalRule: this BatchNorm uses batch statistics; samples interact and "
                "per-sample gradients need the exact path (per_sample_grads handles it)"
            )
        assert call.grad_output is not None and module.running_var is not None
        x = call.activations
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = module.running_mean
        assert mean is not None
        xhat = (x - mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
        return _affine_grads(xhat, call.grad_output, names, keep=[1])


# ---- Embedding -----------------------------------------------------------------------------------
@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    @staticmethod
    def _flat(module: nn.Embedding, call: Call) -> tuple[Tensor, Tensor]:
        idx, g = call.activations, call.grad_output
        assert g is not None
        n = idx.shape[0]
        idx2 = idx.reshape(n, -1)
        g3 = g.reshape(n, -1, g.shape[-1])
        if module.padding_idx is not None:
            g3 = g3 * (idx2 != module.padding_idx).unsqueeze(-1).to(g3.dtype)
        return idx2, g3

    @staticmethod
    def _unsupported(module: nn.Module) -> bool:
        assert isinstance(module, nn.Embedding)
        return bool(module.scale_grad_by_freq) or module.max_norm is not None

    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        assert isinstance(module, nn.Embedding)
        if self._unsupported(module) or call.activations.dim() == 0:
            return FUNC_RULE.grads(module, call, names)
        idx, g = self._flat(module, call)
        out = g.new_zeros(idx.shape[0], module.num_embeddings, module.embedding_dim)
        out.scatter_add_(1, idx.unsqueeze(-1).expand_as(g), g)
        return {"weight": out} if "weight" in names else {}

    def sqnorms(self, module: nn.Module, call: Call, names: list[str]) -> Tensor:
        if self._unsupported(module) or "weight" not in names:
            return super().sqnorms(module, call, names)
        assert isinstance(module, nn.Embedding)
        idx, g = self._flat(module, call)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)
        return (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def dots(
        self, module: nn.Module, call: Call, names: list[str], vectors: Mapping[str, Tensor]
    ) -> Tensor:
        if self._unsupported(module) or "weight" not in names:
            return super().dots(module, call, names, vectors)
        assert isinstance(module, nn.Embedding)
        idx, g = self._flat(module, call)
        v = vectors["weight"]  # [m, vocab, dim]
        rows = v[:, idx]  # [m, N, T, dim]
        return torch.einsum("mntd,ntd->nm", rows, g)
