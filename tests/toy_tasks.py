"""Random 3-feature tasks shared by tests: ``n_support`` support and ``n_query`` query points,
labels in ``range(classes)``, drawn from one generator seeded with ``seed``."""

from __future__ import annotations

import torch

import metafluence as mf


def random_tasks(
    M: int,
    seed: int,
    classes: int = 2,
    n_query: int = 5,
    prefix: str | None = None,
    n_support: int = 4,
) -> list[mf.Task]:
    """``M`` tasks with ids ``0..M-1`` (or ``f"{prefix}{i}"``)."""
    g = torch.Generator().manual_seed(seed)
    return [
        mf.Task(
            support=(
                torch.randn(n_support, 3, generator=g),
                torch.randint(0, classes, (n_support,), generator=g),
            ),
            query=(
                torch.randn(n_query, 3, generator=g),
                torch.randint(0, classes, (n_query,), generator=g),
            ),
            id=i if prefix is None else f"{prefix}{i}",
        )
        for i in range(M)
    ]
