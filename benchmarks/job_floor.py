"""Why the job's λ* cannot be made stationary to a tight tolerance (issue 16, item 4): the radial
floor of its normalised conv blocks, and what a longer stationarity phase does instead.

The problem is ``job_fidelity.py``'s (glyphs, 5-way, Conv-4/32 ANIL, 1 thread, ``M`` tasks,
outer damping ``--damping``; ``--norm``, ``--shots`` and ``--queries`` vary the model and the
tasks). ``λ*``: ``--steps`` Adam steps, then ``--evals`` L-BFGS evaluations (cached, the same
λ* as ``job_fidelity.py --train-only`` with the same arguments). Then:

1. per conv block ``w_b``: ``‖w_b‖``, the radial part of ``∇F`` against ``δ‖w_b‖`` (equal for a
   scale-invariant block, whatever the optimiser) and the tangential part; the floor
   ``δ(Σ_b ‖w_b‖²)^½`` and the blocks :func:`mf.train.radial_floor` finds;
2. with ``--more N``: ``N`` more L-BFGS evaluations from ``λ*`` (memory 50), optionally with the
   damping taken off the scale-invariant blocks (``--exempt``: the objective's damping term is
   replaced by ``δ/2‖mask ⊙ λ‖²``, emulated here, not a library option), and the same table,
   ``F``, target loss and test accuracy before and after.

Writes ``results/job_fidelity/floor-<tag>.json``.

    python benchmarks/job_floor.py --damping 1e-2
    python benchmarks/job_floor.py --damping 1e-2 --more 1600
    python benchmarks/job_floor.py --damping 1e-2 --more 1500 --exempt
    python benchmarks/job_floor.py --damping 1e-3 --norm none --evals 1 --more 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metafluence as mf  # noqa: E402
from influence_cost import Job, log  # noqa: E402
from job_fidelity import job_args, performance, write_row  # noqa: E402
from metafluence.train.stationary import module_blocks  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    job_args(p)
    p.add_argument("--norm", default="group", choices=("group", "none"), help="Conv-4's norm")
    p.add_argument("--shots", type=int, default=None)
    p.add_argument("--queries", type=int, default=None)
    p.add_argument("--more", type=int, default=0, help="more L-BFGS evaluations from λ*")
    p.add_argument("--exempt", action="store_true", help="no damping on invariant blocks")
    return p.parse_args(argv)


def blocks_table(problem: mf.MetaProblem, lam: torch.Tensor, g: torch.Tensor) -> list[dict]:
    """Per module with a conv filter: ‖w_b‖, radial part of ∇F, δ‖w_b‖, tangential part."""
    rows = []
    groups, ndims = module_blocks(problem)
    for mod, parts in groups.items():
        if ndims[mod] != 4:
            continue
        w = torch.cat([lam[s] for s in parts])
        gw = torch.cat([g[s] for s in parts])
        radial = float(w @ gw) / float(w.norm())
        tangential = float((gw - (w @ gw) / (w @ w) * w).norm())
        rows.append(
            {"block": mod, "norm": float(w.norm()), "radial": radial,
             "damping_norm": problem.damping * float(w.norm()), "tangential": tangential}
        )  # fmt: skip
    return rows


class _Masked:
    """``problem`` with the damping term ``δ/2‖mask ⊙ λ‖²`` instead of ``δ/2‖λ‖²`` (duck-typed
    for ``make_stationary``: ``flat``, ``batch``, ``point(x, batch).value_and_grad()``)."""

    def __init__(self, problem: mf.MetaProblem, mask: torch.Tensor) -> None:
        self.problem, self.mask, self.delta = problem, mask, problem.damping

    def __getattr__(self, name: str) -> Any:
        return getattr(self.problem, name)

    def exempted(self, x: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> tuple:
        """``(F, ∇F)`` of the full damping at ``x`` → those of the masked one."""
        off = (1 - self.mask) * x.detach()
        return f - 0.5 * self.delta * (off * x.detach()).sum(), g - self.delta * off

    def point(self, x: torch.Tensor, batch: Any) -> Any:
        outer = self

        class _Pt:
            def value_and_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
                return outer.exempted(x, *outer.problem.point(x, batch).value_and_grad())

        return _Pt()


def state(job: Job, problem: Any, lam: torch.Tensor) -> dict[str, Any]:
    """At ``lam``: ``F`` and ``‖∇F‖`` of the objective being minimised (``problem``), the floor
    and the block table of the job's own objective (damping on every parameter)."""
    batch = job.problem.batch(job.tasks, lam)
    f_job, g_job = job.problem.point(lam, batch).value_and_grad()
    f, g = problem.exempted(lam, f_job, g_job) if isinstance(problem, _Masked) else (f_job, g_job)
    floor, blocks = mf.train.radial_floor(job.problem, lam, batch, grad=g_job.detach())
    return {
        "F": float(f), "grad_norm": float(g.norm()), "radial_floor": floor,
        "scale_invariant": list(blocks), "blocks": blocks_table(job.problem, lam, g_job.detach()),
        **performance(job, job.problem.unflat(lam)),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    mf.keep_freed_memory()
    a.out.mkdir(parents=True, exist_ok=True)
    job = Job(a)
    lam_d, info = job.train()
    lam = job.problem.flat(lam_d).detach()
    P = job.problem.spec.size
    row: dict[str, Any] = {"M": a.M, "P": P, "damping": a.damping, "norm": a.norm}
    row.update(shots=job.cfg.shots, queries=job.cfg.queries, evals=a.evals, more=a.more)
    row.update(
        exempt=a.exempt, stationarity=info["stationarity"], at_lambda=state(job, job.problem, lam)
    )
    log(f"λ*: {json.dumps(row['at_lambda'], default=float)[:600]}")
    if a.more:
        problem: Any = job.problem
        if a.exempt:
            groups, _ = module_blocks(job.problem)
            mask = torch.ones_like(lam)
            for b in row["at_lambda"]["scale_invariant"]:
                for s in groups[b]:
                    mask[s] = 0.0
            problem = _Masked(job.problem, mask)
            row["exempt_parameters"] = int((mask == 0).sum())
        t0 = time.perf_counter()
        out, rep = mf.train.make_stationary(
            problem, lam, job.tasks, tol=1e-5, max_evals=a.more, history_size=50, keep_pairs=0,
            return_best=False, progress=True,
        )  # fmt: skip
        row["more_seconds"] = time.perf_counter() - t0
        row["more_report"] = rep.as_dict()
        row["after"] = state(job, problem, job.problem.flat(out).detach())
        log(f"after {a.more}: {json.dumps(row['after'], default=float)[:600]}")
    tag = f"M{a.M}-d{a.damping:g}{job.variant or '-group'}-e{a.evals}-more{a.more}"
    write_row(a.out / f"floor-{tag}{'-exempt' if a.exempt else ''}.json", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
