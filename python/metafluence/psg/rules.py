"""Per-sample-gradient rules for the standard layers (registered on import).

Notation per module call: ``a`` = activations (input), ``g`` = grad_outputs (gradient of the
summed loss w.r.t. the output; row ``n`` is sample ``n``'s own output gradient), ``N`` samples.

* ``Linear`` (input ``[N, *, in]``, ``T`` = product of the middle dims):
  ``∂ℓ_n/∂W = Σ_t g_{nt} a_{nt}ᵀ``, ``∂ℓ_n/∂b = Σ_t g_{nt}``. Norms: Gram ("ghost") form
  ``Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` when ``T(T+1)/2·(in+out) < T·in·out``, else the tiled op
  :func:`metafluence.ops.psg_linear_sqnorm`; dots: :func:`metafluence.ops.psg_linear_dot`
  (``Σ_t g_tᵀ V a_t``), per layer.
* ``Conv2d`` (any stride, padding, dilation, groups, padding mode, bias): ``∂ℓ_n/∂W[o,c,i,j] =
  Σ_{y,x} g[n,o,y,x] · x_pad[n, c, y·s + i·d, x·s + j·d]`` computed by implicit im2col: for each
  kernel offset ``(i, j)`` one batched matmul of ``g`` (rows padded to the input width) with a
  *strided view* of the padded input -- the unfolded input ``[N, C·k², T]`` is never formed.
  Norms / dots reduce these per-sample gradients one chunk of samples at a time (at most
  ``CHUNK_ELEMS`` gradient entries alive), so ``[N, P]`` is never formed; with few output
  positions the Gram form on the (then small) unfolded input is used instead.
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

CHUNK_ELEMS = 1 << 23  # per-sample gradient entries alive at once in chunked reductions


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
def _conv_geometry(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Explicitly padded input (any padding mode / 'same') and the stride used."""
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    elif isinstance(module.padding, str):
        if module.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
    else:
        ph, pw = module.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
    return x, (module.stride[0], module.stride[1])


def conv2d_weight_psg(module: nn.Conv2d, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``∂ℓ_n/∂W`` ``[N, O, C/groups, kh, kw]`` by implicit im2col (see module doc).

    The padded input is flattened per channel; output position ``(y, x)`` maps to flat index
    ``s·(y·Wp + x)`` plus the kernel offset ``i·d·Wp + j·d``, so each kernel offset is a strided
    *view* ``[N, C, Ho·Wp]``; ``g`` is zero-padded from ``Wo`` to ``Wp`` columns so that the
    wrapped-around positions contribute nothing.
    """
    xp, (sh, sw) = _conv_geometry(module, x)
    n, c, hp, wp = xp.shape
    o, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    groups = module.groups
    if sh != sw:  # the flat-index trick needs one stride; rows via as_strided otherwise
        return _conv2d_weight_psg_unfold(module, xp, g)
    s = sh
    length = ho * wp
    # enough trailing zeros that every strided view stays in bounds
    need = s * (length - 1) + (kh - 1) * dh * wp + (kw - 1) * dw + 1
    flat = xp.reshape(n, c, hp * wp)
    if need > hp * wp:
        flat = F.pad(flat, (0, need - hp * wp))
    flat = flat.contiguous()
    gp = F.pad(g, (0, wp - wo)) if wp > wo else g[..., :wp]
    gf = gp.reshape(n, o, length).to(x.dtype)
    cg, og = c // groups, o // groups
    res = x.new_empty(kh * kw, n, o, cg)
    sn, sc, _ = flat.stride()
    for i in range(kh):
        for j in range(kw):
            off = i * dh * wp + j * dw
            view = flat.as_strided((n, c, length), (sn, sc, s), flat.storage_offset() + off)
            for gi in range(groups):
                torch.bmm(
                    gf[:, gi * og : (gi + 1) * og],
                    view[:, gi * cg : (gi + 1) * cg].transpose(1, 2),
                    out=res[i * kw + j, :, gi * og : (gi + 1) * og],
                )
    return res.permute(1, 2, 3, 0).reshape(n, o, cg, kh, kw)


def unfold_padded(module: nn.Conv2d, xp: Tensor) -> Tensor:
    """``[N, C·kh·kw, Ho·Wo]`` like ``F.unfold`` of the already padded input, built from one
    strided view and one copy (``F.unfold`` is many times slower on CPU)."""
    n, c, hp, wp = xp.shape
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    sh, sw = module.stride
    ho = (hp - dh * (kh - 1) - 1) // sh + 1
    wo = (wp - dw * (kw - 1) - 1) // sw + 1
    xp = xp.contiguous()
    s_n, s_c, s_h, s_w = xp.stride()
    view = xp.as_strided((n, c, kh, kw, ho, wo), (s_n, s_c, dh * s_h, dw * s_w, sh * s_h, sw * s_w))
    return view.reshape(n, c * kh * kw, ho * wo)


def _conv2d_weight_psg_unfold(module: nn.Conv2d, xp: Tensor, g: Tensor) -> Tensor:
    n = xp.shape[0]
    o = g.shape[1]
    groups = module.groups
    u = unfold_padded(module, xp)
    u = u.view(n, groups, -1, u.shape[-1])
    gg = g.reshape(n, groups, o // groups, -1)
    w = torch.einsum("ngot,ngkt->ngok", gg, u)
    return w.reshape(n, o, -1, *module.kernel_size)


@register_rule(nn.Conv2d)
class Conv2dRule(Rule):
    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        assert isinstance(module, nn.Conv2d) and call.grad_output is not None
        x, g = call.activations, call.grad_output
        if x.dim() == 3:  # unbatched input: not per-sample
            return FUNC_RULE.grads(module, call, names)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = conv2d_weight_psg(module, x, g)
        if "bias" in names:
            out["bias"] = g.sum((2, 3))
        return out

    def _chunks(self, module: nn.Conv2d, n: int) -> int:
        per = max(1, module.weight.numel())
        return max(1, CHUNK_ELEMS // per)

    def _gram_ok(self, module: nn.Conv2d, call: Call) -> bool:
        g = call.grad_output
        assert g is not None
        t = g.shape[2] * g.shape[3]
        d_in = module.weight[0].numel()
        return module.groups == 1 and _use_gram(t, d_in, g.shape[1])

    def _unfold(self, module: nn.Conv2d, call: Call) -> tuple[Tensor, Tensor]:
        xp, _ = _conv_geometry(module, call.activations)
        u = unfold_padded(module, xp)
        g = call.grad_output
        assert g is not None
        return u.transpose(1, 2), g.flatten(2).transpose(1, 2)

    def sqnorms(self, module: nn.Module, call: Call, names: list[str]) -> Tensor:
        assert isinstance(module, nn.Conv2d) and call.grad_output is not None
        x, g = call.activations, call.grad_output
        if x.dim() == 3:
            return super().sqnorms(module, call, names)
        out = g.new_zeros(g.shape[0])
        if "weight" in names:
            if self._gram_ok(module, call):
                a3, g3 = self._unfold(module, call)
                out = out + _gram_sqnorm(a3, g3)
            else:
                step = self._chunks(module, x.shape[0])
                parts = [
                    conv2d_weight_psg(module, x[i : i + step], g[i : i + step])
                    .flatten(1)
                    .pow(2)
                    .sum(1)
                    for i in range(0, x.shape[0], step)
                ]
                if parts:
                    out = out + torch.cat(parts)
        if "bias" in names:
            out = out + g.sum((2, 3)).pow(2).sum(1)
        return out

    def dots(
        self, module: nn.Module, call: Call, names: list[str], vectors: Mapping[str, Tensor]
    ) -> Tensor:
        assert isinstance(module, nn.Conv2d) and call.grad_output is not None
        x, g = call.activations, call.grad_output
        if x.dim() == 3:
            return super().dots(module, call, names, vectors)
        out: Tensor | None = None
        if "weight" in names:
            v = vectors["weight"].reshape(vectors["weight"].shape[0], -1)
            step = self._chunks(module, x.shape[0])
            parts = [
                conv2d_weight_psg(module, x[i : i + step], g[i : i + step]).flatten(1) @ v.T
                for i in range(0, x.shape[0], step)
            ]
            out = torch.cat(parts) if parts else g.new_zeros(0, v.shape[0])
        if "bias" in names:
            d = g.sum((2, 3)) @ vectors["bias"].T
            out = d if out is None else out + d
        assert out is not None
        return out


# ---- normalisation layers (affine parameters) ----------------------------------------------------
def _affine_grads(xhat: Tensor, g: Tensor, names: list[str], keep: list[int]) -> dict[str, Tensor]:
    """Sum ``g·x̂`` and ``g`` over every dim except 0 and ``keep``."""
    dims = [d for d in range(1, g.dim()) if d not in keep]
    out: dict[str, Tensor] = {}
    if "weight" in names:
        out["weight"] = (g * xhat).sum(dims) if dims else g * xhat
    if "bias" in names:
        out["bias"] = g.sum(dims) if dims else g
    return out


@register_rule(nn.GroupNorm)
class GroupNormRule(Rule):
    def grads(self, module: nn.Module, call: Call, names: list[str]) -> dict[str, Tensor]:
        assert isinstance(module, nn.GroupNorm) and call.grad_output is not None
        x = call.activations
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        return _affine_grads(xhat, call.grad_output, names, keep=[1])


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
