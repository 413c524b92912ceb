"""Start ``N`` local worker processes the way ``torchrun --standalone`` does.

``metafluence run --nproc N`` calls :func:`launch` with its own arguments (``--nproc`` removed);
the same job also runs unchanged under ``torchrun --nproc-per-node N -m metafluence.cli run ...``.
Either way each worker finds torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), calls :func:`metafluence.distributed.init_from_env` and wraps
its problem in a :class:`~metafluence.distributed.ShardedProblem`.

The workers are started by torch's elastic agent (:func:`torch.distributed.launcher.api.
elastic_launch`, the engine behind ``torchrun``) with a standalone c10d rendezvous on
``localhost`` (a TCP store on a free loopback port; no other network), ``max_restarts=0`` and a
0.1 s monitor: when any worker exits non-zero the agent terminates the others (they may be
blocked in a collective, which would otherwise wait for the gloo/nccl timeout) and
:func:`launch` returns that worker's exit code, after printing the worker's traceback (for an
exception) and one line naming its rank and error.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Sequence
from pathlib import Path

from .._checks import check_int

#: environment variables whose presence marks a process started by torchrun / :func:`launch`
WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: folder where :func:`launch`'s workers leave the traceback of an uncaught exception
_ERRORS_ENV = "METAFLUENCE_LAUNCH_ERRORS"


def in_worker() -> bool:
    """Whether this process was started by ``torchrun`` or :func:`launch` (``RANK`` etc. set)."""
    return all(k in os.environ for k in WORKER_ENV)


def _entry(target: str, argv: list[str]) -> None:
    """Worker body: ``module:function(argv)``; a non-zero return becomes the exit code.

    A failure (an uncaught exception or a non-zero return) is recorded in
    ``$METAFLUENCE_LAUNCH_ERRORS/rank<r>.json`` — when (``time.time_ns``), a one-line message
    and the traceback — before the worker exits: the spawned process would otherwise only hand
    it to the agent's log, and the times tell the first failure (the root cause) from the
    errors it causes in the other ranks (a collective whose peer went away).
    """
    try:
        mod, _, fn = target.partition(":")
        rc = getattr(importlib.import_module(mod), fn)(argv)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        _record(f"{type(e).__name__}: {first}".rstrip(": "), traceback.format_exc())
        raise
    if rc:
        _record(f"returned {int(rc)}", None)
        raise SystemExit(int(rc))


def _record(message: str, tb: str | None) -> None:
    folder = os.environ.get(_ERRORS_ENV)
    if folder:
        rec = {"time_ns": time.time_ns(), "message": message, "traceback": tb}
        (Path(folder) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(rec))


def _root_cause(folder: str, first: int) -> tuple[int, dict[int, dict]]:
    """``(rank that failed first, {rank: record})`` from the workers' failure records.

    ``first`` (the agent's first failure) is the answer when no worker left a record (e.g. it
    was killed by a signal).
    """
    recs = {int(f.stem[4:]): json.loads(f.read_text()) for f in Path(folder).glob("rank*.json")}
    if not recs:
        return first, recs
    return min(recs, key=lambda r: recs[r]["time_ns"]), recs


def launch(argv: Sequence[str], nproc: int, target: str = "metafluence.cli:main") -> int:
    """Run ``target(argv)`` in ``nproc`` local workers; returns the exit code (0: all succeeded).

    Args:
        argv: arguments passed to ``target`` in every worker (the same in all).
        nproc: number of workers (``>= 1``); rank ``r`` gets ``RANK=LOCAL_RANK=r``,
            ``WORLD_SIZE=nproc`` and the ``MASTER_ADDR``/``MASTER_PORT`` of the agent's local
            store.
        target: ``"module:function"``, importable in a fresh interpreter (workers are spawned);
            the function takes the argument list and returns an exit code (``None``/0: success).

    Returns:
        0 when every worker succeeded, otherwise the exit code of the first worker that failed
        (1 for an uncaught exception, whose traceback is printed to stderr; ``128 + s`` for a
        worker killed by signal ``s``). The other workers are terminated, not left waiting in a
        collective. The agent's own log lines are silenced unless ``LOGLEVEL`` is set.
    """
    check_int(nproc, "nproc", minimum=1)
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"target={target!r}: expected 'module:function'")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=int(nproc),
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    quiet = "LOGLEVEL" not in os.environ
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", _ERRORS_ENV)}
    with tempfile.TemporaryDirectory(prefix="metafluence-launch-") as errors:
        # like torchrun: one OpenMP thread per worker unless the user chose a value
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if sys.platform.startswith("linux"):  # all workers are local: gloo over loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ[_ERRORS_ENV] = errors
        was_disabled = logging.root.manager.disable
        if quiet:
            logging.disable(logging.CRITICAL)
        try:
            elastic_launch(config, _entry)(target, list(argv))
        except ChildFailedError as e:
            rank, recs = _root_cause(errors, e.get_first_failure()[0])
            code = e.failures[rank].exitcode if rank in e.failures else 1
            rec = recs.get(rank, {})
            if rec.get("traceback"):
                sys.stderr.write(f"metafluence: traceback of worker rank {rank}:\n")
                sys.stderr.write(rec["traceback"])
            why = f": {rec['message']}" if rec.get("traceback") else ""
            later = [f"rank {r}: {recs[r]['message'][:100]}" for r in sorted(recs) if r != rank]
            print(
                f"metafluence: worker rank {rank} of {nproc} failed first (exit code {code}){why};"
                " the other workers were stopped"
                + (f" (later failures: {'; '.join(later)})" if later else ""),
                file=sys.stderr,
            )
            return 128 - code if code < 0 else (code or 1)
        finally:
            logging.disable(was_disabled)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return 0
