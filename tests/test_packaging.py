"""What a fresh install depends on: declared packages, typed markers, pinned versions, a lean runtime."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    named = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        named += extra
    return [Requirement(text) for text in named]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_package_folder_is_declared_and_typed() -> None:
    declared = set(SETUPTOOLS["packages"])
    for package, folder in SETUPTOOLS["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *relative)) in declared, (
                f"{init.parent} is not in [tool.setuptools] packages"
            )
    for top in ("adapters", "profiles", "engine", "training", "server", "client", "cli"):
        assert (ROOT / top / "py.typed").is_file()
        assert "py.typed" in SETUPTOOLS["package-data"][f"xpeft.{top}"]


def test_constraints_pin_every_declared_requirement_within_its_range() -> None:
    pins = _pins()
    for requirement in _requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement.name} is declared but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    assert pins["torch"] == "2.13.0"  # no build tag: the same file serves the CPU and CUDA builds


def test_the_installed_versions_are_the_pinned_ones() -> None:
    from importlib.metadata import PackageNotFoundError, version

    for name, pinned in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # an optional extra this environment does not have
        assert installed.split("+")[0] == pinned, f"{name}: installed {installed}, constraints.txt {pinned}"


def test_the_runtime_needs_neither_scikit_learn_nor_scipy() -> None:
    runtime = {
        re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in PYPROJECT["project"]["dependencies"]
    }
    assert not runtime & {"scikit-learn", "scipy"}
    code = (
        "import sys; import xpeft.cli.main, xpeft.server.app, xpeft.training.evaluate, xpeft.training.train;"
        "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_image_build_copies_everything_the_install_needs() -> None:
    copied: set[str] = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(part.rstrip("/") for part in line.split()[1:-1])
    needed = {"pyproject.toml", "README.md", "LICENSE", "constraints.txt", "scripts"}
    needed |= {folder.split("/")[0] for folder in SETUPTOOLS["package-dir"].values()}
    assert needed <= copied, f"the Dockerfile does not copy {sorted(needed - copied)}"
    assert '-c "${CONSTRAINTS-constraints.txt}"' in (ROOT / "scripts" / "install.sh").read_text()
