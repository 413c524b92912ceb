"""EK-FAC of the inner Gauss-Newton matrix for adapted ``nn.Linear`` layers (Implicit 'ekfac').

For task ``k`` the Gauss-Newton part of the inner Hessian is
``Σ_j (w_j/n) J_jᵀ ∇²ℓ_j J_j = Σ_j Σ_r (w_j/n) vec(g_jr a_jᵀ) vec(g_jr a_jᵀ)ᵀ`` per layer, where
``a_j`` is the layer input (with a trailing 1 for the bias) and ``g_jr = ∂(logits_j · L_j[:, r]) /
∂out_j`` for the columns ``r`` of ``L_j`` (``L_j L_jᵀ = ∇²ℓ_j`` in the logits). With the
``N' = n·C`` pairs ``(j, r)`` as samples, ``a' = √(w_j/n) a_j`` and ``g' = g_jr``, this is
``N'·E[vec(g'a'ᵀ) vec(g'a'ᵀ)ᵀ]``, which EK-FAC approximates per layer (George et al. 2018).
Statistics are gathered with forward hooks inside ``vmap`` over tasks (one batched call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from ._func import vjp
from .losses import logit_hessian_sqrt


class EKFACLayout:
    """Maps the adapted flat block ``[..., p_a]`` to per-layer ``[..., out, in+1]`` blocks."""

    def __init__(self, fm: Any, inner: Any) -> None:
        self.fm = fm
        spec = fm.spec
        adapted = list(spec.names_of("adapted"))
        offsets: dict[str, tuple[int, int]] = {}
        k = 0
        for n, c in zip(spec.names, spec.numels, strict=True):
            if k >= spec.p_fixed:
                offsets[n] = (k - spec.p_fixed, c)
            k += c
        self.layers: list[tuple[nn.Linear, str, str | None]] = []
        covered: set[str] = set()
        for mname, mod in fm.model.named_modules():
            if isinstance(mod, nn.Linear):
                w = f"{mname}.weight" if mname else "weight"
                b = f"{mname}.bias" if mname else "bias"
                if w in offsets:
                    self.layers.append(
                        (mod, w, b if mod.bias is not None and b in offsets else None)
                    )
                    covered.update({w, b})
        missing = [n for n in adapted if n not in covered]
        if missing or not self.layers:
            raise ValueError(
                "Implicit(solver='ekfac') supports adapted nn.Linear layers only; "
                f"not covered: {missing or adapted} (use solver='cg', 'direct' or 'woodbury')"
            )
        self.offsets = offsets
        self.p_adapt = spec.p_adapt
        self.samples = 1

    def to_blocks(self, X: Tensor) -> list[Tensor]:
        """``[..., p_a]`` → per layer ``[..., out, in+1]`` (bias as the last column)."""
        out = []
        for mod, w, b in self.layers:
            o, c = self.offsets[w]
            W = X[..., o : o + c].reshape(*X.shape[:-1], mod.out_features, mod.in_features)
            if b is None:
                bias = torch.zeros_like(W[..., :1])
            else:
                ob, cb = self.offsets[b]
                bias = X[..., ob : ob + cb].unsqueeze(-1)
            out.append(torch.cat([W, bias], dim=-1))
        return out

    def from_blocks(self, blocks: list[Tensor]) -> Tensor:
        lead = blocks[0].shape[:-2]
        X = torch.zeros(*lead, self.p_adapt, dtype=blocks[0].dtype, device=blocks[0].device)
        for (_, w, b), blk in zip(self.layers, blocks, strict=True):
            o, c = self.offsets[w]
            X[..., o : o + c] = blk[..., :-1].reshape(*lead, c)
            if b is not None:
                ob, cb = self.offsets[b]
                X[..., ob : ob + cb] = blk[..., -1]
        return X

    def statistics(
        self,
        lam: Tensor,
        theta: Tensor,
        batch: Any,
        logits_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        inputs: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer ``a' [M, N', in+1]`` and ``g' [M, N', out]`` at adapted blocks ``theta``.

        ``logits_fn(fixed, adapted, x)`` on ``inputs [M, n, ...]`` (default: the whole model on
        the support inputs; a head-only engine passes its head and the cached body features).
        """
        fm, spec = self.fm, self.fm.spec
        fixed, _ = spec.split(lam)
        mods = [m for m, _, _ in self.layers]
        logits_of = fm.logits_split if logits_fn is None else logits_fn
        xs_all = batch.xs if inputs is None else inputs

        def one(th: Tensor, xs: Tensor, ys: Tensor, w: Tensor):
            n = xs.shape[0]
            acts: dict[int, Tensor] = {}

            def run(perturbs: tuple[Tensor, ...], record: bool) -> Tensor:
                handles = []
                for i, mod in enumerate(mods):

                    def hook(m, inp, out, i=i):
                        if record:
                            acts[i] = inp[0]
                        return out + perturbs[i]

                    handles.append(mod.register_forward_hook(hook))
                try:
                    return logits_of(fixed, th, xs)
                finally:
                    for h in handles:
                        h.remove()

            zeros = tuple(
                torch.zeros(n, m.out_features, dtype=th.dtype, device=th.device) for m in mods
            )
            logits = run(zeros, True)
            if any(a.dim() != 2 for a in acts.values()):
                raise ValueError("Implicit(solver='ekfac') needs 2-D inputs to each nn.Linear")
            L = logit_hessian_sqrt(fm.loss_fn, logits, ys)  # [n, C, C]
            _, pullback = vjp(lambda p: run(p, False), zeros)
            g = vmap(pullback)(L.permute(2, 0, 1))[0]  # per layer [C, n, out]
            scale = (w.clamp_min(0) / n).sqrt().unsqueeze(-1)
            a_out, g_out = [], []
            for i, gi in enumerate(g):
                a = torch.cat([acts[i], torch.ones_like(acts[i][:, :1])], dim=-1) * scale
                C = gi.shape[0]
                a_out.append(a.unsqueeze(0).expand(C, -1, -1).reshape(C * n, -1))
                g_out.append(gi.reshape(C * n, -1))
            return tuple(a_out), tuple(g_out)

        acts, gouts = vmap(one)(theta, xs_all, batch.ys, batch.support_weight)
        self.samples = int(acts[0].shape[1])
        return list(acts), list(gouts)
