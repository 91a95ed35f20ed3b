"""The package's import graph has no cycles (lower layers never import upper ones), counting imports
made inside functions too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import fused_resnet

PACKAGE = Path(fused_resnet.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fused_resnet"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fused_resnet"):
            found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # A package's __init__ re-exports: importing a submodule imports its package, not the reverse.
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_outside_package_inits():
    graph = _graph()
    # A package __init__ importing its submodules, which import the package's siblings, is how
    # Python packages are built; cycles are looked for among the modules themselves.
    modules = {n: {m for m in deps if not PACKAGE.joinpath(*m.split(".")[1:], "__init__.py").exists()}
               for n, deps in graph.items() if not PACKAGE.joinpath(*n.split(".")[1:], "__init__.py").exists()}
    assert len(modules) > 20
    assert _cycle(modules) is None, " -> ".join(_cycle(modules))


def test_the_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
