"""Shared benchmark harness: correctness first, then timing (warm-up + median), CSV rows with
machine, versions, git commit and date.

CPU: wall clock (``time.perf_counter``) after warm-up. CUDA: CUDA events around each call.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# this machine (2 cores): measured fp32 matmul rate and copy bandwidth, for % of peak
PEAK_GFLOPS, COPY_GBS = 130.0, 26.0


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where and with what a measurement was taken."""
    if device.startswith("cuda") and torch.cuda.is_available():
        machine = torch.cuda.get_device_name()
    else:
        machine = platform.processor() or platform.machine()
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "machine": machine,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": git_commit(),
    }


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 15,
    min_time_s: float = 0.0,
) -> dict[str, float]:
    """Median / min / max seconds per call of ``fn`` after ``warmup`` calls."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start_all) < min_time_s:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().clamp_min(1.0)
    return float(((out - ref).abs().max() / scale).item())


def append_csv(path: Path | str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new).

    When ``rows`` bring columns the existing header lacks, the file is rewritten once with the
    union header (older rows get empty cells) instead of appending misaligned rows.
    """
    path = Path(path)
    rows = list(rows)
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, old = list(reader.fieldnames or []), list(reader)
        extra = [k for k in fields if k not in header]
        fields = header + extra
        if extra:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def load_note(threads: int) -> dict[str, Any]:
    """Machine-load columns: the 1-minute load average now, and the torch thread count."""
    la = os.getloadavg()[0]
    return {
        "loadavg_1m": round(la, 2),
        "note": f"{threads} torch thread(s); 1-min load avg {la:.1f} at the row",
    }
