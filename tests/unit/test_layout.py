"""The import rules of ../shared/DESIGN.md, checked on the source tree: the data
path imports nothing of the control path, the monitor never imports the control
plane, the daemon never imports operator tools or local tooling, no import cycles,
and no module over 600 lines without its docstring saying why."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "pgroute"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every pgroute module this file imports, lazily or not."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pgroute")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pgroute"):
                continue
            found.add(target)
            for alias in node.names:  # "from . import divergence" imports a module
                candidate = f"{target}.{alias.name}"
                if (ROOT.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT.parent / candidate.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(candidate)
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except what sits under ``if TYPE_CHECKING:`` (never imported at run time)."""
    out: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return out


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{m} imports {i}"
        for m, deps in GRAPH.items()
        if under(m, *sources)
        for i in sorted(deps)
        if under(i, *forbidden)
    ]


def test_the_data_path_imports_only_model_and_errors() -> None:
    bad = [
        f"{m} imports {i}"
        for m, deps in GRAPH.items()
        if under(m, "pgroute.proxy")
        for i in sorted(deps)
        if not under(i, "pgroute.proxy", "pgroute.model", "pgroute.errors")
    ]
    assert bad == []


def test_the_cluster_layer_imports_only_model_and_errors() -> None:
    # pgroute/cluster is below the control plane and beside the data path: the
    # Controller and the Router will both use it, so it may use neither.
    bad = [
        f"{m} imports {i}"
        for m, deps in GRAPH.items()
        if under(m, "pgroute.cluster")
        for i in sorted(deps)
        if under(i, "pgroute") and not under(i, "pgroute.cluster", "pgroute.model", "pgroute.errors")
    ]
    assert bad == []


def test_the_monitor_never_imports_the_control_plane() -> None:
    assert violations(("pgroute.monitor",), ("pgroute.control", "pgroute.api", "pgroute.cli")) == []


def test_the_control_plane_never_imports_interfaces_or_tools() -> None:
    assert (
        violations(
            ("pgroute.control", "pgroute.pg"),
            ("pgroute.api", "pgroute.cli", "pgroute.demo", "pgroute.tools", "pgroute.local", "pgroute.app"),
        )
        == []
    )


def test_postgres_access_depends_on_nothing_above_it() -> None:
    assert violations(("pgroute.pg",), ("pgroute.control", "pgroute.monitor", "pgroute.proxy", "pgroute.config")) == []


def test_the_daemon_never_imports_local_tooling() -> None:
    daemon = (
        "pgroute.app",
        "pgroute.cluster_node",
        "pgroute.cluster",
        "pgroute.api",
        "pgroute.control",
        "pgroute.monitor",
        "pgroute.proxy",
        "pgroute.pg",
        "pgroute.alerts",
        "pgroute.config",
        "pgroute.logs",
    )
    assert violations(daemon, ("pgroute.local", "pgroute.demo", "pgroute.tools")) == []


def test_no_import_cycles() -> None:
    # Edges to a package's own __init__ re-exporting its modules are not cycles of logic.
    graph = {m: {d for d in deps if d in MODULES and not m.startswith(d + ".")} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small_or_say_why(name: str) -> None:
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    if lines > 600:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "lines" in doc, f"{name} has {lines} lines and its docstring does not say why"
