"""``mf.keep_freed_memory``: applied on Linux/glibc, a no-op elsewhere, results unchanged; the
job applies it on CPU unless told not to."""

from __future__ import annotations

import platform
import sys

import torch

import metafluence as mf
from metafluence import _malloc
from metafluence.cli import build_parser
from tests.bilevel.test_engine import _problem, _tasks


def test_applied_on_glibc_noop_elsewhere_and_values_unchanged(monkeypatch):
    prob = _problem("unrolled", chunk_size=2)
    lam = prob.flat(prob.init_params())
    d = torch.randn(lam.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    before = prob.point(lam, _tasks(5)).hvp(d)
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert mf.keep_freed_memory() is glibc
    assert mf.keep_freed_memory() is glibc  # idempotent
    assert torch.equal(prob.point(lam, _tasks(5)).hvp(d), before)  # allocation, not arithmetic
    monkeypatch.setattr(_malloc.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert mf.keep_freed_memory() is False


def test_the_job_keeps_freed_memory_unless_told_not_to():
    from metafluence.report.job import RunConfig

    assert RunConfig().keep_freed_memory is True
    args = build_parser().parse_args(["run", "--no-keep-freed-memory"])
    assert args.keep_freed_memory is False
    assert build_parser().parse_args(["run"]).keep_freed_memory is True
