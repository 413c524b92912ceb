"""Long stages run in a child process that the kill-and-resume tests SIGKILL mid-run.

``python tests/resume_worker.py train|loo|scores DIR SLEEP`` runs the stage with progress under
``DIR`` and appends one line per unit of work (a meta-training step, a leave-one-out retrain, a
total solve or a chunk of removal scores) to ``DIR/work.log``, sleeping ``SLEEP`` seconds per
unit so the parent can kill it mid-run. The parent imports the same setup (:func:`problem`,
:func:`train`, :func:`loo`, :func:`scores`) to rerun the stage to completion and to compute the
uninterrupted reference.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

if __name__ == "__main__":  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import metafluence as mf
from metafluence.evaluate import leave_one_out
from metafluence.evaluate.loo import newton_retrain
from metafluence.train.checkpoint import default_checkpoint_path, meta_train_resumable
from tests.influence.test_determinism import tasks

STEPS, EVERY = 24, 3
TRAIN_KW = dict(outer_lr=0.05, seed=3, batch_size=4, optimizer="adam")


def problem(chunk_size: int | None = None) -> tuple[nn.Module, mf.MetaProblem]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    inner = mf.inner.Unrolled(steps=1, lr=0.3)
    return model, mf.MetaProblem(model, inner=inner, damping=1e-2, chunk_size=chunk_size)


def _log(directory: Path, line: str, sleep: float) -> None:
    with open(directory / "work.log", "a") as fh:
        fh.write(line + "\n")
        fh.flush()
    if sleep:
        time.sleep(sleep)


def train(directory: Path, sleep: float = 0.0, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Resumable meta-training; logs ``step <it>`` per step."""
    model, prob = problem()

    def callback(it: int, lam: torch.Tensor, f: float) -> None:
        _log(directory, f"step {it}", sleep)

    return meta_train_resumable(
        prob,
        model,
        tasks(12, 0),
        default_checkpoint_path(directory),
        steps=steps,
        every=EVERY,
        callback=callback,
        **TRAIN_KW,
    )


def loo(directory: Path, sleep: float = 0.0) -> torch.Tensor:
    """Resumable leave-one-out over 8 tasks (Newton retraining); logs ``item <k>`` per retrain."""
    model, prob = problem()
    lam = mf.train.meta_train(prob, model, tasks(8, 0), steps=5, outer_lr=0.05, seed=1)
    newton = newton_retrain(prob, max_steps=3)

    def retrain(batch, start):
        removed = (batch.task_weight == 0).nonzero().flatten().tolist()
        _log(directory, f"item {removed[0]}", sleep)
        return newton(batch, start)

    return leave_one_out(
        prob, lam, tasks(8, 0), tasks(3, 1), retrain=retrain, checkpoint_dir=directory / "loo"
    )


class Dataset:
    """Random-access tasks (``len`` + ``__getitem__``): a streamed :class:`TaskSource`."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def scores(
    directory: Path,
    sleep: float = 0.0,
    streamed: bool = False,
    store: bool = True,
    target=None,
    tape: bool = True,
    **kw,
) -> mf.InfluenceResult:
    """Resumable removal effects, 8 tasks in chunks of 2; logs ``solve`` per total solve and
    ``chunk <first task>`` per chunk of scores made by a mixed product (before it is saved).
    ``tape=False``: the solve's products are not read off (every chunk by a mixed product)."""
    from unittest import mock

    from metafluence.bilevel._tape import ProductTape
    from metafluence.bilevel.point import BilevelPoint
    from metafluence.influence import removal

    _, prob = problem(chunk_size=2)
    chunk_scores, solve = BilevelPoint.chunk_item_scores, removal._solve

    def logged_chunk(engine, s):
        out = chunk_scores(engine, s)
        _log(directory, f"chunk {engine.batch.ids[0]}", sleep)
        return out

    def logged_solve(*args, **kwargs):
        out = solve(*args, **kwargs)
        _log(directory, "solve", sleep)
        return out

    train = Dataset(tasks(8, 0)) if streamed else tasks(8, 0)
    args = dict(solve_damping=0.3, solver_kwargs={"maxiter": 30}, lanczos_steps=5)
    args.update(kw)
    directory.mkdir(parents=True, exist_ok=True)
    with (
        mock.patch.object(BilevelPoint, "chunk_item_scores", staticmethod(logged_chunk)),
        mock.patch.object(removal, "_solve", logged_solve),
        mock.patch.object(ProductTape, "MAX_BYTES", ProductTape.MAX_BYTES if tape else 0),
    ):
        return mf.removal_effects(
            prob,
            prob.init_params(),
            train,
            tasks(3, 1) if target is None else target,
            checkpoint_dir=directory / "scores" if store else None,
            **args,
        )


def work_log(directory: Path) -> list[str]:
    p = directory / "work.log"
    return p.read_text().split("\n")[:-1] if p.exists() else []


def run_and_kill(mode: str, directory: Path, ready, sleep: float, timeout: float = 300.0) -> int:
    """Start the ``mode`` worker, SIGKILL it as soon as ``ready()`` is true; its return code.

    Fails if the worker finishes (or dies) before ``ready()`` holds: the test would then not
    exercise an interruption.
    """
    import os
    import signal
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, mode, str(directory), str(sleep)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"worker exited ({proc.returncode}) before the kill:\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no progress file after {timeout} s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the parent (conftest): identical arithmetic
    mode, where, pause = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    modes = {"train": train, "loo": loo, "scores": scores}
    modes["scores-products"] = lambda d, p: scores(d, p, tape=False)
    modes[mode](where, pause)
