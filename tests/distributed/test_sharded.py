"""Two gloo processes on one machine give the single-process numbers (float64, rel 1e-10)."""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import metafluence as mf
from metafluence.distributed import ShardedProblem, shard_range
from tests.toy_tasks import random_tasks

pytestmark = pytest.mark.distributed


def tasks(M: int, seed: int) -> list[mf.Task]:
    return random_tasks(M, seed, prefix="t")


def build(inner: str) -> mf.MetaProblem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    maps = {
        "unrolled": mf.inner.Unrolled(steps=2, lr=0.3),
        "implicit": mf.inner.Implicit(reg=2.0, steps=5, lr=0.2, newton_steps=8),
    }
    return mf.MetaProblem(model, inner=maps[inner], damping=1e-2, chunk_size=2)


def compute(prob: mf.MetaProblem, stream: bool) -> dict[str, torch.Tensor]:
    """Everything a run does, as tensors: training, scores of three kinds, an edit."""
    train = tasks(7, 0)
    src = mf.TaskSource(train) if stream else train
    lam = mf.train.meta_train(prob, None, src, steps=3, outer_lr=0.05, seed=1, batch_size=5)
    res = mf.removal_effects(
        prob,
        lam,
        src,
        target=tasks(2, 9),
        solver="cg" if not stream else "direct",
        solve_damping=0.5,
        solver_kwargs={"maxiter": 30, "rtol": 1e-12} if not stream else None,
        lanczos_steps=3,
    )
    remove = {"task": [1, 6], "query_point": [(3, 2)]}
    ed = mf.edit(prob, lam, src, remove, solver="direct", solve_damping=0.5)
    out = {f"lam.{k}": v for k, v in lam.items()}
    out.update({f"edit.{k}": v for k, v in ed.items()})
    out["task"] = res.all_scores["task"]
    out["support"] = torch.stack(res.all_scores["support_point"])
    out["query"] = torch.stack(res.all_scores["query_point"])
    out["lambda_min"] = torch.tensor(res.diagnostics["lambda_min"], dtype=torch.float64)
    assert res.task_ids == [f"t{i}" for i in range(7)]
    return out


def worker(rank: int, world: int, store: str, out_dir: str, inner: str, stream: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        prob = ShardedProblem(build(inner))
        result = compute(prob, stream)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        # no rank tears gloo down while a peer may still read from it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_shard_range_covers_everything():
    for M in (0, 1, 5, 7, 100):
        for world in (1, 2, 3, 8):
            parts = [shard_range(M, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == M
            assert all(a[1] == b[0] for a, b in zip(parts[:-1], parts[1:], strict=True))
    with pytest.raises(ValueError, match="rank=2, world=2"):
        shard_range(4, 2, 2)


def test_sharded_problem_needs_init():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedProblem(build("unrolled"))


@pytest.mark.parametrize(("inner", "stream"), [("unrolled", False), ("implicit", True)])
def test_two_processes_equal_one(tmp_path, inner, stream):
    if sys.platform == "win32":
        pytest.skip("gloo file store on posix only")
    ref = compute(build(inner), stream)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for attempt in range(2):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        try:
            mp.start_processes(
                worker,
                args=(2, str(run_dir / "store"), str(run_dir), inner, stream),
                nprocs=2,
                start_method="spawn",
            )
            break
        except mp.ProcessExitedException as e:
            # a worker killed by a signal (gloo's teardown has aborted rarely on loaded CI
            # machines); a real fault repeats on the second attempt and fails the test
            if attempt or not e.signal_name:
                raise
            warnings.warn(f"retrying after {e}", stacklevel=1)
    for rank in range(2):
        got = torch.load(run_dir / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            scale = float(v.abs().max()) if v.numel() else 0.0
            err = float((got[k] - v).abs().max()) if v.numel() else 0.0
            assert err <= 1e-10 * max(scale, 1e-30), (rank, k, err, scale)


def resume_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """Scores with a progress store; then one process loses a chunk and both rerun: the
    process that lacks it makes the solve's products again, which are collective, so the
    other one must take part (no hang), and the scores are the same bits."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        prob = ShardedProblem(build("unrolled"))
        lam = prob.init_params()
        ckpt = Path(out_dir) / "scores"
        kw = dict(
            target=tasks(2, 9),
            solver="cg",
            solve_damping=0.5,
            solver_kwargs={"maxiter": 30, "rtol": 1e-12},
            lanczos_steps=3,
            checkpoint_dir=ckpt,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = mf.removal_effects(prob, lam, tasks(7, 0), **kw)
            dist.barrier()
            if rank == 1:
                lost = sorted(ckpt.glob(f"rank1-of-{world}/scores-*.safetensors"))
                assert lost, "rank 1 stored no chunk"
                lost[0].unlink()
            dist.barrier()
            again = mf.removal_effects(prob, lam, tasks(7, 0), **kw)
        out = {"first": first.all_scores["task"], "again": again.all_scores["task"]}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_chunk_lost_on_one_process_is_read_off_products_all_make_again(tmp_path):
    if sys.platform == "win32":
        pytest.skip("gloo file store on posix only")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(
        resume_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
        join=False,
    )

    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the rerun hung: products re-made on the process that lost a chunk only")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["first"], got["again"])
