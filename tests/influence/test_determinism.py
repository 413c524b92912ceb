"""Same seed, same inputs → bit-identical training and scores on CPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import metafluence as mf
from tests.toy_tasks import random_tasks


def tasks(M, seed):
    return random_tasks(M, seed, n_query=6)


def run_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    prob = mf.MetaProblem(model, inner=mf.inner.Unrolled(steps=1, lr=0.3), damping=1e-2)
    lam = mf.train.meta_train(
        prob, model, tasks(12, 0), steps=20, outer_lr=0.05, seed=3, batch_size=4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = mf.removal_effects(
            prob,
            lam,
            tasks(12, 0),
            target=tasks(3, 1),
            solver_kwargs={"maxiter": 20},
            solve_damping=0.1,
        )
    return lam, res


def test_same_seed_identical_scores():
    lam1, r1 = run_once()
    lam2, r2 = run_once()
    for k in lam1:
        assert torch.equal(lam1[k], lam2[k])
    assert torch.equal(r1.scores, r2.scores)
    for a, b in zip(r1.all_scores["support_point"], r2.all_scores["support_point"], strict=True):
        assert torch.equal(a, b)
    assert r1.diagnostics["lambda_min"] == r2.diagnostics["lambda_min"]


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_same_threads_identical_scores(threads):
    """The README's promise, exactly: same seed and same thread count → identical scores. (A
    different thread count may change the last bits: torch's CPU kernels split their sums by
    thread; that is why the promise names the thread count.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [run_once() for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    (lam1, r1), (lam2, r2) = runs
    assert digest(lam1, r1) == digest(lam2, r2)


# ---- across processes, in deterministic mode ---------------------------------------------------


def digest(lam, res):
    """sha256 of the meta-parameters and every score tensor (bit-exact fingerprint)."""
    import hashlib

    h = hashlib.sha256()
    tensors = [lam[k] for k in sorted(lam)] + [res.scores, *res.all_scores["support_point"]]
    for t in tensors:
        h.update(t.detach().double().numpy().tobytes())
    return h.hexdigest()


_WORKER = """
import torch
import metafluence as mf
mf.set_deterministic(True)
torch.set_num_threads(1)
from tests.influence.test_determinism import digest, run_once
print("DIGEST", digest(*run_once()))
"""


def test_same_seed_bit_identical_across_processes():
    """Two fresh interpreters (different hash seeds, so no dict/set-order luck) in
    deterministic mode give bit-identical meta-parameters and scores."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    procs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    digests = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        line = next(ln for ln in out.splitlines() if ln.startswith("DIGEST"))
        digests.append(line.split()[1])
    assert digests[0] == digests[1], digests
    # and equal to this process (not in deterministic mode: on the CPU it changes nothing)
    if torch.get_num_threads() == 1:
        assert digest(*run_once()) == digests[0]


def test_set_deterministic_switches_and_restores(monkeypatch):
    import os

    from metafluence import _determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.backends.cudnn.benchmark = True
    try:
        state = mf.set_deterministic(True)
        assert state["enabled"] and torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert _determinism.is_deterministic()
        with _determinism.deterministic(False):
            assert not _determinism.is_deterministic()
            assert torch.backends.cudnn.benchmark
        assert _determinism.is_deterministic() and not torch.backends.cudnn.benchmark
        mf.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark, "previous cudnn.benchmark not restored"
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        with pytest.raises(TypeError, match="enabled must be a bool"):
            mf.set_deterministic("yes")
    finally:
        mf.set_deterministic(False)
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1:]


def test_deterministic_mode_scores_equal_default_on_cpu():
    """On the CPU the mode changes no bits: same scores with and without it."""
    from metafluence import _determinism

    _, r1 = run_once()
    with _determinism.deterministic(True):
        _, r2 = run_once()
    assert torch.equal(r1.scores, r2.scores)
