"""The floors of the house: no module imports a layer above its own (docs/architecture.md).

Every module of ``python/metafluence`` is parsed (``ast``, nothing is imported) and each import
of another part of the package (top-level ``import``/``from``, and imports inside functions) is
checked against :data:`LAYERS`. A part may import its own layer and the layers below it.
:data:`KNOWN_UPWARD` lists today's exceptions with a reason each; the list can only shrink: an
exception that no longer occurs fails the test too, so it is removed when it is fixed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "metafluence"

#: Layers from the bottom. A "part" is a subpackage or a module at the package root;
#: ``metafluence`` is the root ``__init__`` (the public namespace, which gathers the layers below).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "_checks", "_jit", "_loader", "_determinism", "_malloc", "_store"),  # foundation
    ("reference", "kernels"),  # pure-PyTorch twins; Triton kernels
    ("ops", "_build"),  # one entry per op, the only backend choice; build information
    ("psg",),
    ("solvers",),
    ("models", "data"),
    ("bilevel", "inner"),
    ("train", "influence"),
    ("evaluate", "distributed"),
    ("integrations",),
    ("metafluence",),
    ("report",),
    ("cli", "smoke"),  # applications: the command line, the installed-package smoke test
)
LEVEL = {part: i for i, layer in enumerate(LAYERS) for part in layer}

#: ``(file relative to the package, imported part) -> reason``. May only shrink.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """``metafluence.x.y`` -> ``x``; the root package -> ``metafluence``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def _imports_of(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Absolute names of the package modules that ``source`` (module ``module``) imports."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [
                (a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "metafluence"
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "metafluence":
                target = node.module
            else:
                continue
            if target == "metafluence":  # `from metafluence import x` / `from . import x` at root
                found += [(f"metafluence.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((target, node.lineno))
    return found


def _imports(path: Path) -> list[tuple[str, int]]:
    return _imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_has_a_layer() -> None:
    parts = {_part(_module_name(f)) for f in _files()}
    missing = sorted(parts - set(LEVEL))
    assert not missing, f"place these in LAYERS (and docs/architecture.md): {missing}"


def test_no_upward_imports() -> None:
    upward: list[str] = []
    seen: set[tuple[str, str]] = set()
    for f in _files():
        rel = f.relative_to(PACKAGE).as_posix()
        src = _part(_module_name(f))
        for target, line in _imports(f):
            dst = _part(target)
            if dst not in LEVEL or src not in LEVEL or LEVEL[dst] <= LEVEL[src]:
                continue
            if (rel, dst) in KNOWN_UPWARD:
                seen.add((rel, dst))
                continue
            upward.append(
                f"{rel}:{line} ({src}, layer {LEVEL[src]}) imports {target} "
                f"({dst}, layer {LEVEL[dst]})"
            )
    assert not upward, "upward imports:\n" + "\n".join(upward)
    stale = sorted(set(KNOWN_UPWARD) - seen)
    assert not stale, f"fixed: remove from KNOWN_UPWARD: {stale}"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("from ..bilevel.tasks import Task", "metafluence.bilevel.tasks"),
        ("from .. import ops", "metafluence.ops"),
        ("from .core import per_sample_grads", "metafluence.psg.core"),
        ("import metafluence as mf", "metafluence"),
        ("def f():\n    from metafluence.report import metrics", "metafluence.report"),
    ],
)
def test_import_resolution(code: str, expected: str) -> None:
    """The walker resolves relative, absolute and lazy imports (a module ``metafluence.psg.x``)."""
    assert [name for name, _ in _imports_of(code, "metafluence.psg.x", False)] == [expected]


def _module_graph() -> dict[str, set[str]]:
    """``module -> package modules it imports`` (lazy imports included; a package's
    ``__init__`` re-exports are edges too)."""
    names = {_module_name(f) for f in _files()}
    graph: dict[str, set[str]] = {}
    for f in _files():
        mod = _module_name(f)
        graph[mod] = {t for t, _ in _imports(f) if t in names and t != mod}
    return graph


def test_no_import_cycles_within_a_part() -> None:
    """Two modules of one part never import each other, directly or around a loop (the loader
    cycle `data/glyphs.py` ↔ `data/loaders.py`, once hidden inside functions, is the example).
    Package ``__init__`` modules are left out: they gather their part's modules by design."""
    graph = {
        m: {t for t in ts if _part(t) == _part(m) and not _is_package(t)}
        for m, ts in _module_graph().items()
        if not _is_package(m)
    }
    cycles: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*path[path.index(t) :], t]))
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()
