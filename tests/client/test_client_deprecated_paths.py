"""The server's former client modules still import, for one release, and say where to go."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MOVED = [
    ("xpeft.server.client", "xpeft.client.clients"),
    ("xpeft.server.client_core", "xpeft.client.core"),
    ("xpeft.server.training_client", "xpeft.client.training"),
]


@pytest.mark.parametrize(("old", "new"), MOVED)
def test_an_old_path_warns_and_gives_the_same_objects(old: str, new: str) -> None:
    sys.modules.pop(old, None)  # a fresh import, so that its warning is raised here
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*import xpeft\.client"):
        shim = importlib.import_module(old)
    target = importlib.import_module(new)
    assert shim.__all__ == target.__all__ and len(target.__all__) >= 5
    for name in target.__all__:
        assert getattr(shim, name) is getattr(target, name), name


def test_a_script_on_the_old_path_still_runs_and_fails_under_error_warnings() -> None:
    code = "from xpeft.server.client import Client, ClientError; print(Client.__module__)"
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and ran.stdout.strip() == "xpeft.client.clients", ran.stderr
    # shown by default for a script's own import, and attributed to the importing line
    assert ran.stderr.startswith("<string>:1: DeprecationWarning: xpeft.server.client is deprecated")
    strict = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert strict.returncode == 1 and "DeprecationWarning: xpeft.server.client is deprecated" in strict.stderr
