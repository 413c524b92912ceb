"""How much memory a point's engines may spend on kept linearisations (gradient graphs).

A kept linearisation (:meth:`UnrolledEngine.linearised`) holds the graph of ``∇Φ`` of its
chunk — the chunk's activations — for as long as its point lives. ``chunk_size`` bounds what
one product allocates at a time; keeping every chunk's graph would grow with ``M`` instead.
So a point hands its engines one :class:`LinearisationBudget`: each measures what its build
added to the memory in use (CUDA: ``torch.cuda.memory_allocated``; CPU: the process's
resident set, ``/proc/self/statm``) and keeps the graph only while the total stays within the
budget; past it, products build their own graph, one chunk at a time, as before.
"""

from __future__ import annotations

import os

import torch

#: the share of the device's memory (CPU: physical memory) kept linearisations may use
DEFAULT_FRACTION = 0.25


def memory_in_use(device: torch.device) -> int | None:
    """Bytes in use on ``device`` by this process (``None`` when it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_total(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (CPU: physical memory; ``None`` when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type != "cpu":
        return None
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


class LinearisationBudget:
    """``left`` bytes that kept linearisations may still take (see the module docstring)."""

    def __init__(self, nbytes: int) -> None:
        self._left = int(nbytes)
        self._share: tuple[torch.device, float] | None = None  # measured on first use

    @classmethod
    def share(cls, device: torch.device, fraction: float = DEFAULT_FRACTION) -> LinearisationBudget:
        """``fraction`` of ``device``'s memory (nothing when it cannot be measured), read when
        first spent: a point that never linearises (every step of training) never reads it."""
        budget = cls(0)
        budget._share = (device, fraction)
        return budget

    @property
    def left(self) -> int:
        if self._share is not None:
            device, fraction = self._share
            self._share = None
            total = memory_total(device)
            if total is not None and memory_in_use(device) is not None:
                self._left = int(fraction * total)
        return self._left

    def take(self, nbytes: int | None) -> bool:
        """Whether a linearisation that added ``nbytes`` may be kept (then they are spent)."""
        if nbytes is None or self.left <= 0 or nbytes > self.left:
            return False
        self._left -= max(int(nbytes), 0)
        return True
