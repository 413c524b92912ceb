"""Deterministic mode and the op dispatcher: a backend registered as nondeterministic is routed
around (``auto``) or refused (forced) while the mode is on; the shipped native kernels give
bit-identical results on repeated calls and for any number of CPU threads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metafluence import _determinism, _loader, ops
from metafluence.ops import BackendUnavailableError, _dispatch

from ._strategies import FEW, randn, seeds

NATIVE = _loader.STATE.loaded and _loader.has_kernel("psg_linear_sqnorm", "cpu")


@pytest.fixture
def fake_op():
    """An op whose ``native`` backend is declared nondeterministic (always available)."""
    name = "_test_nondeterministic_op"
    checks = _dispatch.register_op(
        name,
        {b: _dispatch.reference_check for b in _dispatch.BACKENDS},
        nondeterministic={"native": "float atomicAdd over tiles"},
    )
    yield name, checks
    _dispatch.REGISTRY.pop(name, None)


def test_nondeterministic_backend_routed_around(fake_op, monkeypatch):
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)
    name, checks = fake_op
    cpu, f32 = torch.device("cpu"), torch.float32
    assert _dispatch.select_backend(name, checks, cpu, f32) == "native"
    with _determinism.deterministic(True):
        assert _dispatch.select_backend(name, checks, cpu, f32) == "reference"
        with pytest.raises(BackendUnavailableError, match="nondeterministic .*atomicAdd"):
            _dispatch.select_backend(name, checks, cpu, f32, backend="native")
        report = _dispatch.backend_report(name)
        assert "deterministic mode is on" in report["native"]
    assert _dispatch.select_backend(name, checks, cpu, f32, backend="native") == "native"


def test_register_op_rejects_unknown_backend_names():
    with pytest.raises(ValueError, match="unknown backends"):
        _dispatch.register_op(
            "_x", {b: _dispatch.reference_check for b in _dispatch.BACKENDS}, {"cuda": "?"}
        )


def test_shipped_ops_stay_available_in_deterministic_mode(monkeypatch):
    """No shipped backend is nondeterministic: the mode changes no choice."""
    monkeypatch.delenv("METAFLUENCE_BACKEND", raising=False)
    before = {op: _dispatch.backend_report(op) for op in _dispatch.REGISTRY if op[0] != "_"}
    with _determinism.deterministic(True):
        after = {op: _dispatch.backend_report(op) for op in before}
    assert after == before


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.skipif(not NATIVE, reason="no native CPU kernels")
@FEW
@given(
    n=st.integers(1, 40),
    t=st.integers(1, 9),
    seed=seeds,
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_native_kernels_bit_identical_across_calls_and_threads(n, t, seed, dtype):
    a = randn((n, t, 33), seed, dtype)
    g = randn((n, t, 17), seed + 1, dtype)
    v = randn((3, 17, 33), seed + 2, dtype)
    k, P = 5, 40000  # > two CPU chunks of the fused updates (16384 elements)
    x, p = randn((k, P), seed + 3, dtype), randn((k, P), seed + 4, dtype)
    Ap = 2.0 * p + 0.1 * randn((k, P), seed + 5, dtype)
    rz = torch.ones(k, dtype=dtype)
    act = torch.ones(k, dtype=torch.bool)

    def run():
        outs = [
            ops.psg_linear(a, g, backend="native"),
            ops.psg_linear_sqnorm(a, g, backend="native"),
            ops.psg_linear_dot(a, g, v, backend="native"),
        ]
        xs, rs, cm = x.clone(), x.clone(), torch.zeros(k, dtype=dtype)
        rr, _ = ops.cg_update_(xs, rs, cm, p, Ap, rz, act, 1e-6, backend="native")
        return [*outs, xs, rs, rr]

    first = _with_threads(1, run)
    for threads in (1, 2, 3):
        for ref, out in zip(first, _with_threads(threads, run), strict=True):
            assert torch.equal(ref, out), f"differs with {threads} threads"
