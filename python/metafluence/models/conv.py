"""Conv-4 and MLP for few-shot classification (the last layer is named ``head``).

Normalisation is ``"group"`` (GroupNorm, per-sample: safe under ``vmap`` and second-order
autodiff), ``"batch"`` (BatchNorm with ``track_running_stats=False``: batch statistics only, as
in MAML's transductive setting) or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

NORMS = ("group", "batch", "none")
POOLS = ("max", "stride")


class MaxPool2x2(nn.Module):
    """2×2 max pooling by reshape + ``amax``: same values as ``nn.MaxPool2d(2)`` but with a
    cheap batching rule under ``torch.func.vmap`` (``max_pool2d``'s backward is ~10× slower
    there). Odd trailing rows/columns are dropped, as in ``MaxPool2d(2)``."""

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        h2, w2 = h // 2, w // 2
        return x[..., : 2 * h2, : 2 * w2].reshape(n, c, h2, 2, w2, 2).amax(dim=(3, 5))


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        groups = max(1, min(8, channels // 4))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r}: expected one of {NORMS}")


class Conv4(nn.Module):
    """Four blocks ``conv3×3(width) → norm → ReLU → maxpool2``, then ``head: Linear(·, ways)``.

    ``pool="stride"`` replaces each conv + max-pool by a stride-2 conv (about 4× cheaper, and
    the fast choice for second-order influence on a CPU).

    Input ``[N, C, H, W]`` (``C=1, H=W=28`` for Omniglot-like data; ``C=3, H=W=84`` for
    miniImageNet-like data); output logits ``[N, ways]``. The flattened feature size follows
    from the input size (28 → 1×1×width, 84 → 5×5×width).
    """

    def __init__(
        self,
        ways: int = 5,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 32,
        blocks: int = 4,
        norm: str = "group",
        pool: str = "max",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: expected one of {NORMS}")
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: expected one of {POOLS}")
        layers: list[nn.Module] = []
        c, size = in_channels, int(image_size)
        for _ in range(int(blocks)):
            if pool == "max":
                layers += [
                    nn.Conv2d(c, width, 3, padding=1),
                    _norm(norm, width),
                    nn.ReLU(),
                    MaxPool2x2(),
                ]
                size = size // 2
            else:
                layers += [
                    nn.Conv2d(c, width, 3, stride=2, padding=1),
                    _norm(norm, width),
                    nn.ReLU(),
                ]
                size = (size + 1) // 2
            c = width
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for {blocks} pooling blocks")
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.features = width * size * size
        self.head = nn.Linear(self.features, int(ways))
        self.in_channels, self.image_size = in_channels, int(image_size)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv4 input has shape {tuple(x.shape)}, expected [N, {self.in_channels}, H, W]"
            )
        return self.head(self.body(x))


class MLP(nn.Module):
    """``Flatten → [Linear → ReLU] × len(hidden) → head: Linear(·, ways)``."""

    def __init__(self, in_features: int, ways: int = 5, hidden: Sequence[int] = (64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = int(in_features)
        for h in hidden:
            layers += [nn.Linear(d, int(h)), nn.ReLU()]
            d = int(h)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, int(ways))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build_model(
    name: str,
    ways: int,
    in_channels: int,
    image_size: int,
    width: int = 32,
    norm: str = "group",
    seed: int | None = 0,
    pool: str = "max",
) -> nn.Module:
    """``"conv4"`` or ``"mlp"`` with seeded initialisation (``seed=None``: global RNG)."""
    if seed is not None:
        torch.manual_seed(int(seed))
    if name == "conv4":
        return Conv4(ways, in_channels, image_size, width=width, norm=norm, pool=pool)
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, ways, hidden=(width * 4, width * 4))
    raise ValueError(f"model={name!r}: expected 'conv4' or 'mlp'")
