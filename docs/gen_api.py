"""Write docs/api.md: the API reference, generated from the docstrings.

python docs/gen_api.py            # rewrite docs/api.md
python docs/gen_api.py --check    # exit 1 if docs/api.md is out of date
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "api.md"

SECTIONS: list[tuple[str, list[str]]] = [
    (
        "metafluence",
        [
            "MetaProblem",
            "Task",
            "TaskBatch",
            "TaskSource",
            "removal_effects",
            "fit_curvature",
            "Curvature",
            "InfluenceResult",
            "param_influence",
            "edit",
            "psg_linear",
            "psg_linear_sqnorm",
            "psg_linear_dot",
            "per_sample_grads",
            "per_sample_grad_norms",
            "per_sample_grad_dots",
            "build_info",
            "set_deterministic",
            "keep_freed_memory",
        ],
    ),
    ("metafluence.inner", ["Unrolled", "Implicit", "HeadOnly"]),
    ("metafluence.train", ["meta_train", "make_stationary", "StationarityReport"]),
    ("metafluence.evaluate", ["leave_one_out"]),
    ("metafluence.data", ["TaskDataset"]),
    ("metafluence.distributed", ["ShardedProblem", "init_from_env", "shard_range"]),
    ("metafluence.distributed.launch", ["launch"]),
    (
        "metafluence.solvers",
        ["SolveResult", "solve_cg", "solve_neumann", "solve_arnoldi", "solve_direct", "get_solver"],
    ),
    (
        "metafluence.integrations.dattri",
        [
            "ihvp_cg",
            "ihvp_at_x_cg",
            "ihvp_lissa",
            "ihvp_at_x_lissa",
            "ihvp_arnoldi",
            "ihvp_at_x_arnoldi",
            "ihvp_dataset_cg",
            "hvp_at_x",
        ],
    ),
    ("metafluence.integrations.dattri_attributor", ["IFAttributorMetafluence"]),
    ("metafluence.integrations.torchopt", ["solve_cg", "solve_neumann", "solve_direct"]),
    ("metafluence.integrations.models", ["unwrap", "inner_from_maml", "FunctionalModel"]),
    (
        "metafluence.integrations.kronfluence",
        ["per_sample_gradient", "pairwise_score", "self_score", "use_metafluence_kernels"],
    ),
]


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"


def render() -> str:
    lines = [
        "# metafluence API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; do not edit by hand.",
        "See [guide.md](guide.md) for concepts and choices.",
        "",
    ]
    for modname, names in SECTIONS:
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:  # an optional third-party library is missing
            lines += [f"## `{modname}`", "", f"(not importable here: {exc})", ""]
            continue
        lines += [f"## `{modname}`", ""]
        doc = inspect.getdoc(mod)
        if doc and modname != "metafluence":
            lines += [doc.split("\n\n")[0], ""]
        for name in names:
            obj = getattr(mod, name)
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [
                f"### `{name}`",
                "",
                "```python",
                f"{kind} {name}{_signature(obj)}",
                "```",
                "",
            ]
            lines += ["```text", inspect.getdoc(obj) or "(no docstring)", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        ok = OUT.exists() and OUT.read_text() == text
        print("docs/api.md is up to date" if ok else "docs/api.md is out of date")
        return 0 if ok else 1
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
