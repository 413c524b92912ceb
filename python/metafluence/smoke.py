"""The package's smoke test: ``python -m metafluence.smoke [--require-native]``.

Meant for a fresh install (it needs nothing but the package and torch): imports metafluence,
prints :func:`metafluence.build_info` as JSON, then checks on the CPU in float64

* ``per_sample_grads`` of a small MLP against ``torch.func`` (``vmap(grad(...))``), and
* ``psg_linear`` on every backend that can run against the einsum definition.

Exit status 0 when everything agrees (and, with ``--require-native``, the compiled kernels were
loaded and used), 1 otherwise; each check prints one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from torch import nn

import metafluence as mf
from metafluence.ops import _dispatch

TOL = 1e-10  # float64: every backend agrees with the reference to rounding


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_per_sample_grads() -> float:
    """Largest relative error of ``mf.per_sample_grads`` against ``torch.func``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    got = mf.per_sample_grads(model, params, x, y, "cross_entropy")

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (xi[None],))
        return nn.functional.cross_entropy(logits, yi[None])

    want = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return max(_max_rel_err(got[k], want[k]) for k in params)


def check_psg_linear() -> dict[str, float | str]:
    """``psg_linear`` on each backend: relative error vs einsum, or why it was skipped."""
    torch.manual_seed(1)
    a = torch.randn(6, 4, 9, dtype=torch.float64)
    g = torch.randn(6, 4, 5, dtype=torch.float64)
    want = torch.einsum("nto,nti->noi", g, a)
    out: dict[str, float | str] = {}
    for name, why in _dispatch.backend_report("psg_linear", a.device, a.dtype).items():
        out[name] = (
            why if why is not None else _max_rel_err(mf.psg_linear(a, g, backend=name), want)
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the smoke test; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m metafluence.smoke", description=__doc__)
    parser.add_argument(
        "--require-native", action="store_true", help="fail unless the compiled kernels ran"
    )
    args = parser.parse_args(argv)
    info = mf.build_info()
    print(json.dumps({"metafluence": mf.__file__, "build_info": info}, indent=1, default=str))
    ok = True
    err = check_per_sample_grads()
    ok &= err <= TOL
    print(f"per_sample_grads vs torch.func: max rel err {err:.1e}")
    for name, res in check_psg_linear().items():
        if isinstance(res, str):
            print(f"psg_linear[{name}]: skipped ({res})")
            ok &= not (args.require_native and name == "native")
        else:
            ok &= res <= TOL
            print(f"psg_linear[{name}] vs einsum: max rel err {res:.1e}")
    if args.require_native and not info["native"]["loaded"]:
        print(f"native kernels not loaded: {info['native']['reason']}")
        ok = False
    print("smoke " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
