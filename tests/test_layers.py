"""The import layers: adapters <- profiles <- server <- cli, and no import cycle among modules.

Checked by walking the source with ``ast`` rather than with import-linter: it needs no extra tool
or configuration format, it sees imports inside functions (where the CLI keeps its heavy ones)
and under ``TYPE_CHECKING`` alike, and it runs in the same ``pytest`` that CI already runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> its folder, lowest layer first; a package may import only those before it
LAYERS = {"adapters": "adapters", "profiles": "profiles", "server": "server", "cli": "cli"}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    """``profiles/data.py`` -> ``xpeft.profiles.data``; a package's ``__init__`` is the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("xpeft", *parts))


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Every ``xpeft.*`` module ``path`` imports, at any depth of the file (functions included).

    ``module`` is the file's module name (default: from its place in the repository).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = (module or module_name(path)).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("xpeft.")}


def sources() -> dict[str, Path]:
    return {module_name(p): p for folder in LAYERS.values() for p in sorted((ROOT / folder).rglob("*.py"))}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_sources_are_found() -> None:
    found = {layer_of(m) for m in sources()}
    assert found == set(LAYERS), found  # every layer has modules, so the checks below are not vacuous


@pytest.mark.parametrize("layer", ORDER)
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed = set(ORDER[: ORDER.index(layer) + 1])
    wrong = sorted(
        f"{module} imports {target}"
        for module, path in sources().items()
        if layer_of(module) == layer
        for target in imports_of(path)
        if layer_of(target) not in allowed
    )
    assert not wrong, "imports against the layers adapters <- profiles <- server <- cli:\n" + "\n".join(wrong)


def test_no_module_level_import_cycle() -> None:
    """Imports at module level (not inside functions) form no cycle between modules."""
    modules = sources()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[module] = {t for t in targets if t in modules and t != module}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walker finds imports inside functions and relative ones, so a violation cannot hide."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from xpeft.server.client import Client\n\nfrom ..cli import main\n")
    found = imports_of(probe, "xpeft.profiles.probe")
    assert {"xpeft.server.client", "xpeft.cli", "xpeft.cli.main"} <= found
    assert {layer_of(name) for name in found} == {"server", "cli"}
