"""The package's layering, read from its source: no import cycle, kernels below the root API, one planner."""

from __future__ import annotations

import ast
import pathlib

import pytest

import covpool
from covpool.linalg.options import OPTION_FIELDS, USED_BY, RootOptions

PACKAGE = pathlib.Path(covpool.__file__).parent
ROOT_API = {
    "covpool.linalg.roots",
    "covpool.linalg.runner",
    "covpool.linalg.planner",
    "covpool.linalg.options",
    "covpool.linalg.opaque",
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, *, lazy: bool) -> set[str]:
    """The covpool modules ``path`` imports: at its top level only, or (``lazy``) inside functions too."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if lazy else iter(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph ``edges``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _parents(name: str) -> set[str]:
    """The packages whose ``__init__`` importing ``name`` runs first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))} & set(MODULES)


def test_no_import_cycle_at_import_time():
    """Top-level imports, each with the package ``__init__`` files it runs."""
    edges = {}
    for name, path in MODULES.items():
        targets = _imports(path, lazy=False)
        edges[name] = targets | {parent for target in targets for parent in _parents(target)} - {name}
    edges = {name: targets - _parents(name) for name, targets in edges.items()}
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


def test_no_import_cycle_between_modules_counting_imports_inside_functions():
    edges = {name: _imports(path, lazy=True) - {name} for name, path in MODULES.items()}
    assert _cycle(edges) is None, f"import cycle: {' -> '.join(_cycle(edges))}"


@pytest.mark.parametrize("name", sorted(name for name in MODULES if name.startswith("covpool.kernels")))
def test_kernels_never_import_the_root_api(name):
    assert not _imports(MODULES[name], lazy=True) & ROOT_API


def test_only_the_planner_builds_a_plan():
    builders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RootPlan":
                builders.append(name)
    assert builders == ["covpool.linalg.planner"]


def test_option_fields_and_their_methods_come_from_one_declaration():
    assert OPTION_FIELDS == tuple(RootOptions.__dataclass_fields__)
    assert USED_BY["eigh"] == {"precision", "check_input"}
    assert USED_BY["ns"] == {"steps", "normalization", "precision", "check_input"}
    assert USED_BY["mtp"] == set(OPTION_FIELDS) - {"method"}
    with pytest.raises(TypeError, match="unknown keyword arguments \\['tolerance'\\].*tol, condition"):
        covpool.sqrtm(covpool.testing.random_spd(1, n=4), tolerance=1e-3)
