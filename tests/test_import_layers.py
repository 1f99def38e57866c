"""The import rules: adapters <- profiles <- server <- cli, the client beside the server, no
private name taken from another module, and no import cycle among modules.

Checked by walking the source with ``ast`` rather than with import-linter: it needs no extra tool
or configuration format, it sees imports inside functions (where the CLI keeps its heavy ones)
and under ``TYPE_CHECKING`` alike, and it runs in the same ``pytest`` that CI already runs.
Cycles count imports at any depth: one inside a function still ties the two modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> its folder, lowest layer first
LAYERS = {
    "adapters": "adapters",
    "profiles": "profiles",
    "engine": "engine",
    "server": "server",
    "client": "client",
    "cli": "cli",
}
ORDER = list(LAYERS)
# What each package may import (a module, or one under it): the layers below it. The client
# stands beside the server, not on it: of the server it takes only the wire's fixed points
# (server/wire.py), of adapters only the errors, so it pulls in neither torch nor the server's
# dependencies; the server never imports the client. The command may import every package.
ALLOWED: dict[str, tuple[str, ...]] = {
    "adapters": ("xpeft.adapters",),
    "profiles": ("xpeft.adapters", "xpeft.profiles"),
    "engine": ("xpeft.adapters", "xpeft.profiles", "xpeft.engine"),
    "server": ("xpeft.adapters", "xpeft.profiles", "xpeft.engine", "xpeft.server"),
    "client": ("xpeft.adapters.errors", "xpeft.server.wire", "xpeft.client"),
    "cli": tuple(f"xpeft.{layer}" for layer in LAYERS),
}
# Deprecated for one release: the server's former client modules, which re-export xpeft.client.
SHIMS = {"xpeft.server.client", "xpeft.server.client_core", "xpeft.server.training_client"}
# Folders held to the private-name and cycle rules too, though they sit outside the layers.
OUTSIDE = ("bench",)


def module_name(path: Path, root: Path = ROOT) -> str:
    """``profiles/data.py`` -> ``xpeft.profiles.data``; ``bench/load/run.py`` -> ``bench.load.run``;
    a package's ``__init__`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts if parts[0] in OUTSIDE else ("xpeft", *parts))


def _imports(tree: ast.AST, path: Path, module: str) -> Iterator[tuple[str, list[ast.alias]]]:
    """``(module, names)`` of every import in ``tree`` at any depth, relative ones resolved."""
    here = module.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            yield base, node.names


def _ours(name: str) -> bool:
    return name.startswith("xpeft.") or name.split(".")[0] in OUTSIDE


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Every ``xpeft.*`` (or bench) module or name ``path`` imports, at any depth of the file
    (functions and ``TYPE_CHECKING`` blocks included). ``module``: the file's module name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for base, names in _imports(tree, path, module or module_name(path)):
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in names)
    return {name for name in found if _ours(name)}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, module: str | None = None, known: set[str] | None = None) -> list[str]:
    """Private names (``_x``) this file takes from another of our modules: imported
    (``from m import _x``, ``import m._x``), or read as an attribute of a module it imported
    (``from pkg import m`` then ``m._x``). ``known``: the module names that count as modules."""
    module = module or module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> one of our modules
    for base, names in _imports(tree, path, module):
        if not _ours(base) or base == module:
            continue
        found.extend(f"{base}.{alias.name}" for alias in names if _private(alias.name))
        found.extend(base for part in base.split(".") if _private(part))
        for alias in names:
            if known is None or f"{base}.{alias.name}" in known:
                aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and _ours(alias.name):
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            found.append(f"{aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def sources(folders: tuple[str, ...] = tuple(LAYERS.values())) -> dict[str, Path]:
    return {module_name(p): p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "xpeft" and parts[1] in LAYERS else None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` when it has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules among ``modules`` it imports, at any depth. ``from pkg import mod``
    leads to ``pkg.mod`` alone; ``from pkg import name`` (a name defined in it) to ``pkg``."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for base, names in _imports(tree, path, module):
            subs = {f"{base}.{alias.name}" for alias in names} & modules.keys()
            targets |= subs
            if len(subs) < len(names) or not names:
                targets.add(base)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def test_the_sources_are_found() -> None:
    found = {layer_of(m) for m in sources()}
    assert found == set(LAYERS), found  # every layer has modules, so the checks below are not vacuous
    assert any(m.startswith("bench.") for m in sources(OUTSIDE))


def allowed(module: str, target: str) -> bool:
    """Whether ``module`` may import ``target`` (a module or a name in one)."""
    prefixes = ALLOWED[layer_of(module) or ""] + (("xpeft.client",) if module in SHIMS else ())
    return any(target == p or target.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", ORDER)
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, path in sources().items()
        if layer_of(module) == layer
        for target in imports_of(path)
        if not allowed(module, target)
    )
    assert not wrong, "imports against the layers (tests/test_import_layers.py: ALLOWED):\n" + "\n".join(
        wrong
    )


def test_the_rule_refuses_what_it_should() -> None:
    assert allowed("xpeft.client.core", "xpeft.server.wire.PROFILE_ID_PATTERN")
    assert allowed("xpeft.client.core", "xpeft.adapters.errors")
    assert not allowed("xpeft.client.core", "xpeft.server.settings")
    assert not allowed("xpeft.client.core", "xpeft.adapters.encoder")
    assert not allowed("xpeft.server.routes", "xpeft.client")
    assert allowed("xpeft.server.client", "xpeft.client.clients")
    assert not allowed("xpeft.profiles.train", "xpeft.server.wire")
    assert allowed("xpeft.cli.remote", "xpeft.client")


def test_importing_the_client_loads_neither_torch_nor_the_server() -> None:
    """What the rule is for, checked on a real import in a fresh interpreter."""
    code = (
        "import sys, xpeft.client; print(sorted(m for m in ('torch', 'transformers', 'fastapi', "
        "'pydantic_settings', 'xpeft.server.settings', 'xpeft.profiles') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]", done.stdout


def bench_folder(module: str, path: Path | None = None) -> str:
    """``bench.load.run`` -> ``load``; a top-level ``bench/x.py`` (or the package) -> ``""``."""
    parts = module.split(".")
    is_package = path is not None and path.name == "__init__.py"
    return parts[1] if len(parts) > 2 or (is_package and len(parts) == 2) else ""


def test_bench_harnesses_share_only_bench_common() -> None:
    """A harness folder imports its own modules, bench/common/ and the top-level bench modules,
    never another harness; bench/common/ imports only itself."""
    modules = sources(OUTSIDE)
    graph = import_graph(modules)
    wrong = []
    for module, path in modules.items():
        mine = bench_folder(module, path)
        for target in graph[module]:
            theirs = bench_folder(target, modules[target])
            if theirs not in (mine, "common") and not (theirs == "" and mine != "common"):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "bench harnesses importing each other (share through bench/common/):\n" + "\n".join(
        wrong
    )


def test_no_private_name_is_taken_from_another_module() -> None:
    """A name with a leading underscore is its module's own business: code elsewhere (bench
    included) that needs it gets a public name in a module of its own."""
    modules = sources((*LAYERS.values(), *OUTSIDE))
    wrong = sorted(
        f"{module} uses {name}"
        for module, path in modules.items()
        for name in private_uses(path, module, set(modules))
    )
    assert not wrong, "private names used outside their module:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    """No two modules import each other, directly or around a loop, at any depth of the file."""
    cycle = find_cycle(import_graph(sources((*LAYERS.values(), *OUTSIDE))))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The walker finds imports inside functions, under ``TYPE_CHECKING`` and relative ones, so a
    violation cannot hide."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from xpeft.server.state import ServerState\n"
        "def f():\n    from xpeft.server.client import Client\n\nfrom ..cli import main\n"
    )
    found = imports_of(probe, "xpeft.profiles.probe")
    assert {"xpeft.server.client", "xpeft.server.state", "xpeft.cli", "xpeft.cli.main"} <= found
    assert {layer_of(name) for name in found} == {"server", "cli"}
    assert not any(allowed("xpeft.profiles.probe", name) for name in found)


def test_the_checker_sees_private_names(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from xpeft.server.routes import router, _check_id\n"
        "from xpeft.server import routes as r\n"
        "import xpeft.server.jobs.trainer as t\n"
        "def f():\n    from . import _helper\n    return r._server, t._store, r.router, __name__\n"
        "from xpeft.server.app import __all__\n"
    )
    known = {"xpeft.server.routes", "xpeft.server.jobs.trainer"}
    assert private_uses(probe, "xpeft.server.probe", known) == [
        "xpeft.server._helper",
        "xpeft.server.jobs.trainer._store",
        "xpeft.server.routes._check_id",
        "xpeft.server.routes._server",
    ]


def test_the_checker_sees_a_cycle_through_a_function_import(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import xpeft.server.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from xpeft.server.c import x\n")
    (tmp_path / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import xpeft.server.a\n"
    )
    modules = {f"xpeft.server.{n}": tmp_path / f"{n}.py" for n in "abc"}
    cycle = find_cycle(import_graph(modules))
    assert cycle == ["xpeft.server.a", "xpeft.server.b", "xpeft.server.c", "xpeft.server.a"]
    (tmp_path / "c.py").write_text("from xpeft.server.b import x\n")
    assert find_cycle(import_graph(modules)) == ["xpeft.server.b", "xpeft.server.c", "xpeft.server.b"]
