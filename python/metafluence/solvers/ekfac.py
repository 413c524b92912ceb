"""K-FAC / EK-FAC factors of linear layers and the inverse they imply (George et al., 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import check_damping, check_float_tensor, check_same_device, eps

__all__ = [
    "KFACFactors",
    "KFACLayerFactors",
    "compute_kfac_factors",
    "compute_kfac_factors_batched",
    "ekfac_matvec",
    "solve_ekfac",
]


@dataclass
class KFACLayerFactors:
    """Kronecker factors of one linear layer ``y = W a`` (``W`` ``[out, in]``).

    Vectors live in the layer's weight space as ``[out, in]`` blocks (row-major ``vec``), where
    the per-sample gradient is ``g aᵀ`` and ``vec(g aᵀ) = g ⊗ a``. The implied curvature is::

        F ≈ (Q_G ⊗ Q_A) diag(vec Λ) (Q_G ⊗ Q_A)ᵀ,

    with ``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ`` and ``Λ = λ_G λ_Aᵀ`` (K-FAC,
    ``F ≈ G ⊗ A``) or the EK-FAC corrected ``Λ_ij = E_n[(Q_Gᵀ G_n Q_A)_ij²]`` (``G_n`` the
    per-sample weight gradient).

    Attributes:
        activation_cov: ``A = E[a aᵀ]`` ``[in, in]``.
        grad_cov: ``G = E_n[Σ_t g gᵀ]`` ``[out, out]``.
        activation_eigvals / activation_eigvecs: ``λ_A`` ``[in]``, ``Q_A`` ``[in, in]``.
        grad_eigvals / grad_eigvecs: ``λ_G`` ``[out]``, ``Q_G`` ``[out, out]``.
        eigvals: ``Λ`` ``[out, in]`` used by :func:`solve_ekfac`.
        corrected: whether ``eigvals`` holds the EK-FAC correction.
        num_samples: ``N``.
    """

    activation_cov: Tensor
    grad_cov: Tensor
    activation_eigvals: Tensor
    activation_eigvecs: Tensor
    grad_eigvals: Tensor
    grad_eigvecs: Tensor
    eigvals: Tensor
    corrected: bool
    num_samples: int

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the layer's weight block."""
        return (self.grad_cov.shape[-1], self.activation_cov.shape[-1])

    def to_eigenbasis(self, block: Tensor) -> Tensor:
        """``Q_Gᵀ V Q_A`` for ``V`` ``[..., out, in]``."""
        return self.grad_eigvecs.mT @ block @ self.activation_eigvecs

    def from_eigenbasis(self, block: Tensor) -> Tensor:
        """``Q_G C Q_Aᵀ`` for ``C`` ``[..., out, in]``."""
        return self.grad_eigvecs @ block @ self.activation_eigvecs.mT


@dataclass
class KFACFactors:
    """K-FAC / EK-FAC factors of a list of linear layers (block-diagonal across layers)."""

    layers: list[KFACLayerFactors]

    @classmethod
    def from_activations(
        cls,
        activations: Sequence[Tensor],
        grad_outputs: Sequence[Tensor],
        correct_eigenvalues: bool = True,
        chunk: int = 1024,
    ) -> KFACFactors:
        """Alias of :func:`compute_kfac_factors`."""
        return compute_kfac_factors(activations, grad_outputs, correct_eigenvalues, chunk)

    def __len__(self) -> int:
        return len(self.layers)


def _check_layer(a: Tensor, g: Tensor, idx: int) -> None:
    """Types, finiteness and devices of one layer's activations / grad_outputs."""
    check_float_tensor(a, f"layer {idx}: activations")
    check_float_tensor(g, f"layer {idx}: grad_outputs")
    check_same_device(g, f"layer {idx}: grad_outputs", a, "activations")


def _check_layer_counts(activations: Sequence[Tensor], grad_outputs: Sequence[Tensor]) -> None:
    if len(activations) != len(grad_outputs):
        raise ValueError(
            f"activations has {len(activations)} layers but grad_outputs has {len(grad_outputs)}"
        )


def _layer_factors(a: Tensor, g: Tensor, correct: bool, chunk: int, idx: int) -> KFACLayerFactors:
    _check_layer(a, g, idx)
    if a.dim() not in (2, 3) or g.dim() != a.dim():
        raise ValueError(
            f"layer {idx}: activations {list(a.shape)} / grad_outputs {list(g.shape)}: expected "
            "[N, in] / [N, out] or [N, T, in] / [N, T, out]"
        )
    if a.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"layer {idx}: activations {list(a.shape)} and grad_outputs {list(g.shape)} "
            "disagree on the leading (sample) dims"
        )
    if g.dtype != a.dtype:
        g = g.to(a.dtype)
    N = a.shape[0]
    if N == 0:
        raise ValueError(f"layer {idx}: activations has N=0 samples")
    a3 = a if a.dim() == 3 else a.unsqueeze(1)  # [N, T, in]
    g3 = g if g.dim() == 3 else g.unsqueeze(1)  # [N, T, out]
    T = a3.shape[1]
    af = a3.reshape(N * T, -1)
    gf = g3.reshape(N * T, -1)
    A = af.T @ af / (N * T)
    G = gf.T @ gf / N
    A = 0.5 * (A + A.T)
    G = 0.5 * (G + G.T)
    lam_a, Q_a = torch.linalg.eigh(A)
    lam_g, Q_g = torch.linalg.eigh(G)
    if not correct:
        lam = lam_g[:, None] * lam_a[None, :]
    elif T == 1:
        # Λ = E_n[(Q_Gᵀ g)² ((Q_Aᵀ a)²)ᵀ]: no per-sample [out, in] tensor needed
        ap = (af @ Q_a) ** 2  # [N, in]
        gp = (gf @ Q_g) ** 2  # [N, out]
        lam = gp.T @ ap / N
    else:
        lam = torch.zeros(g3.shape[-1], a3.shape[-1], dtype=a.dtype, device=a.device)
        for s in range(0, N, chunk):
            ap = a3[s : s + chunk] @ Q_a  # [n, T, in]
            gp = g3[s : s + chunk] @ Q_g  # [n, T, out]
            lam = lam + ((gp.transpose(1, 2) @ ap) ** 2).sum(0)  # per-sample Q_Gᵀ G_n Q_A
        lam = lam / N
    return KFACLayerFactors(
        activation_cov=A,
        grad_cov=G,
        activation_eigvals=lam_a,
        activation_eigvecs=Q_a,
        grad_eigvals=lam_g,
        grad_eigvecs=Q_g,
        eigvals=lam,
        corrected=correct,
        num_samples=N,
    )


def compute_kfac_factors(
    activations: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    correct_eigenvalues: bool = True,
    chunk: int = 1024,
) -> KFACFactors:
    r"""K-FAC factors, their eigendecompositions and (optionally) the EK-FAC correction.

    For each linear layer ``l`` with inputs ``a`` (append a constant 1 for the bias) and output
    gradients ``g`` of each sample's own loss, per-sample weight gradient ``G_n = Σ_t g_{n,t}
    a_{n,t}ᵀ``::

        A = mean_{n,t} a aᵀ            [in, in]
        G = mean_n Σ_t g gᵀ            [out, out]
        Λ_ij = mean_n ((Q_Gᵀ G_n Q_A)_ij)²     (EK-FAC; K-FAC: Λ = λ_G λ_Aᵀ)

    For ``T = 1`` the correction is computed as ``((g Q_G)²)ᵀ (a Q_A)² / N`` without forming
    ``[N, out, in]``; for ``T > 1`` in chunks of ``chunk`` samples.

    Args:
        activations: per layer ``[N, in]`` or ``[N, T, in]``.
        grad_outputs: per layer ``[N, out]`` or ``[N, T, out]``.
        correct_eigenvalues: EK-FAC (True) or plain K-FAC eigenvalues (False).
    """
    _check_layer_counts(activations, grad_outputs)
    layers = [
        _layer_factors(a, g, correct_eigenvalues, chunk, i)
        for i, (a, g) in enumerate(zip(activations, grad_outputs, strict=True))
    ]
    return KFACFactors(layers)


def compute_kfac_factors_batched(
    activations: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    correct_eigenvalues: bool = True,
) -> KFACFactors:
    r"""Independent (E)K-FAC factors for a batch of ``B`` problems (e.g. one per task).

    Same formulas as :func:`compute_kfac_factors` with ``T = 1``, batched over a leading dim:
    activations ``[B, N, in]``, grad_outputs ``[B, N, out]`` per layer. The factors then hold
    ``[B, ...]`` tensors, and :func:`solve_ekfac` takes blocks ``[B, out, in]`` or
    ``[k, B, out, in]`` (broadcasting over the batch).
    """
    _check_layer_counts(activations, grad_outputs)
    layers = []
    for i, (a, g) in enumerate(zip(activations, grad_outputs, strict=True)):
        _check_layer(a, g, i)
        if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
            raise ValueError(
                f"layer {i}: activations {list(a.shape)} / grad_outputs {list(g.shape)}: "
                "expected [B, N, in] / [B, N, out]"
            )
        g = g.to(a.dtype)
        N = a.shape[1]
        A = a.mT @ a / N
        G = g.mT @ g / N
        A = 0.5 * (A + A.mT)
        G = 0.5 * (G + G.mT)
        lam_a, Q_a = torch.linalg.eigh(A)
        lam_g, Q_g = torch.linalg.eigh(G)
        if correct_eigenvalues:
            lam = ((g @ Q_g) ** 2).mT @ ((a @ Q_a) ** 2) / N
        else:
            lam = lam_g[..., :, None] * lam_a[..., None, :]
        layers.append(KFACLayerFactors(A, G, lam_a, Q_a, lam_g, Q_g, lam, correct_eigenvalues, N))
    return KFACFactors(layers)


def _check_blocks(factors: KFACFactors, blocks: Sequence[Tensor], name: str) -> None:
    if len(blocks) != len(factors.layers):
        raise ValueError(f"{name} has {len(blocks)} blocks, expected {len(factors.layers)} layers")
    for i, (blk, lf) in enumerate(zip(blocks, factors.layers, strict=True)):
        check_float_tensor(blk, f"{name}[{i}]")
        check_same_device(blk, f"{name}[{i}]", lf.eigvals, "the factors")
        batch_dims = lf.eigvals.dim() - 2  # > 0 for compute_kfac_factors_batched
        if blk.dim() - batch_dims not in (2, 3) or tuple(blk.shape[-2:]) != lf.shape:
            raise ValueError(
                f"{name}[{i}] has shape {list(blk.shape)}, expected {list(lf.shape)} "
                f"or [k, {lf.shape[0]}, {lf.shape[1]}]"
            )


def ekfac_matvec(
    factors: KFACFactors, blocks: Sequence[Tensor], damping: float = 0.0
) -> list[Tensor]:
    """Apply the implied curvature ``(Q_G ⊗ Q_A)(Λ + damping)(Q_G ⊗ Q_A)ᵀ`` per layer.

    ``blocks``: per layer ``[out, in]`` or ``[k, out, in]``; returns the same shapes.
    """
    damping = check_damping(damping)
    _check_blocks(factors, blocks, "blocks")
    out = []
    for blk, lf in zip(blocks, factors.layers, strict=True):
        blk = blk.to(lf.eigvals.dtype)
        out.append(lf.from_eigenbasis(lf.to_eigenbasis(blk) * (lf.eigvals + damping)))
    return out


def solve_ekfac(
    factors: KFACFactors, b_blocks: Sequence[Tensor], damping: float = 0.0
) -> list[Tensor]:
    r"""Inverse of the (E)K-FAC curvature applied to ``b``, layer by layer::

        X_l = Q_G [ (Q_Gᵀ B_l Q_A) / (Λ_l + damping) ] Q_Aᵀ

    the exact inverse of :func:`ekfac_matvec` with the same ``damping``.

    Args:
        factors: from :func:`compute_kfac_factors`.
        b_blocks: per layer ``[out, in]`` or ``[k, out, in]`` (k right-hand sides).
        damping: ``>= 0``; with ``damping = 0`` every ``Λ`` must exceed ``eps · max(out, in) ·
            max Λ`` (else ``ValueError``).

    Returns:
        The solution blocks, same shapes as ``b_blocks`` (a direct method: no ``SolveResult``).
    """
    damping = check_damping(damping)
    _check_blocks(factors, b_blocks, "b_blocks")
    if damping == 0.0:
        for i, lf in enumerate(factors.layers):
            lam = lf.eigvals
            floor = eps(lam.dtype) * max(lam.shape) * lam.abs().max()
            if lam.numel() > 0 and not bool((lam > floor).all()):
                raise ValueError(
                    f"damping=0 but layer {i} has (numerically) zero or negative (E)K-FAC "
                    "eigenvalues; pass damping > 0"
                )
    out = []
    for blk, lf in zip(b_blocks, factors.layers, strict=True):
        blk = blk.to(lf.eigvals.dtype)
        out.append(lf.from_eigenbasis(lf.to_eigenbasis(blk) / (lf.eigvals + damping)))
    return out
