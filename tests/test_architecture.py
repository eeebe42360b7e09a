"""The architecture holds: layers import only downwards, no import cycles, no hidden imports, small files.

The packages are layered ``ondevice`` <- ``memory`` <- ``devices`` <- ``federated`` (a package may import
the ones to its left), and ``ondevice/cli/`` is the application layer that may import all of them. Every
module's imports are read from its source (module level, inside functions and under ``TYPE_CHECKING``
alike), so a lazy import cannot hide an upward edge or a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("ondevice", "memory", "devices", "federated")
APPLICATION = "ondevice.cli"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name lives in (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> Iterator[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [name if name in MODULES else base for name in targets]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                yield resolved, node.lineno, id(node) in in_function


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def _is_application(module: str) -> bool:
    return module == APPLICATION or module.startswith(APPLICATION + ".")


def test_the_scan_sees_every_package_and_resolves_imports() -> None:
    assert {name.split(".")[0] for name in MODULES} == set(LAYERS)
    edges = {target for target, _, _ in _imports("ondevice.cli.demo")}
    assert {"memory", "federated", "devices"} & {edge.split(".")[0] for edge in edges}
    assert "ondevice.errors" in {target for target, _, _ in _imports("ondevice.prepared")}


def test_no_module_imports_a_layer_above_it() -> None:
    upward = [
        f"{module} (line {line}) imports {target}"
        for module in MODULES
        if not _is_application(module)
        for target, line, _ in _imports(module)
        if _layer(target) > _layer(module) or _is_application(target)
    ]
    order = "ondevice <- memory <- devices <- federated"
    assert not upward, f"imports against the layer order {order}:\n" + "\n".join(upward)


def test_no_import_cycles_among_modules() -> None:
    graph = {module: {target for target, _, _ in _imports(module)} for module in MODULES}
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not cycles, "modules that import each other (directly or around a loop):\n" + "\n".join(
        ", ".join(component) for component in cycles
    )


def test_no_project_imports_hide_inside_functions() -> None:
    hidden = [
        f"{module} (line {line}) imports {target} inside a function"
        for module in MODULES
        for target, line, inside in _imports(module)
        if inside
    ]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_exceeds_the_size_limit(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (limit {MAX_LINES})"
