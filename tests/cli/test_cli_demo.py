"""``xpeft demo --once`` as a user runs it: a real server, three profiles over HTTP, one mixed burst."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from xpeft.cli.demo import BURST, EXAMPLES
from xpeft.profiles import format as xpm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_once_serves_three_profiles_in_shared_batches(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xpeft.cli",
            "demo",
            "--once",
            "--workdir",
            str(tmp_path),
            "--port",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    log = (tmp_path / "server.log").read_text() if (tmp_path / "server.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\nserver log:\n{log[-3000:]}"
    out = proc.stdout
    print(f"xpeft demo --once took {time.monotonic() - start:.1f} s")

    # three profiles with different label sets, trained from the bundled examples and uploaded
    labels = {pid: xpm.load(tmp_path / f"{pid}.xpm").labels for pid in EXAMPLES}
    assert sorted(len(names) for names in labels.values()) == [2, 3, 4]
    for pid in EXAMPLES:
        assert f"uploaded {pid!r} over HTTP" in out
    with sqlite3.connect(tmp_path / "profiles.sqlite3") as db:
        assert {row[0] for row in db.execute("SELECT id FROM profiles")} == set(EXAMPLES)

    # every request of the burst answered by its own profile, in order
    answers = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(answers) == len(BURST), out
    for line, (pid, text) in zip(answers, BURST, strict=True):
        fields = line.split()
        assert fields[0] == pid and fields[2] in labels[pid] and line.endswith(text), line
        assert 0 < float(fields[3]) <= 1

    # /metrics: fewer forwards than requests, and at least one forward held several profiles
    found = re.search(r"answered in (\d+) forward passes .*; (\d+) of the (\d+) forwards mixed", out)
    assert found, out
    forwards, mixed = int(found[1]), int(found[2])
    assert 1 <= forwards < len(BURST) and 1 <= mixed <= forwards
    # --once stops the server: nothing listens any more, and no curl line was offered
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert "Serving on" not in out and "Traceback" not in proc.stderr


def test_demo_refuses_bad_arguments(capsys) -> None:
    from xpeft.cli.main import main

    assert main(["demo", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: bad_argument: argument --port")


def test_serving_ends_on_ctrl_c_or_with_the_server(tmp_path, capsys) -> None:
    """The demo's last phase supervises the server process: Ctrl-C stops it, a server that stopped
    itself (status 0, after a signal) ends the demo quietly, a crashed one is an error."""
    import signal
    import threading

    from xpeft.adapters.errors import XPeftError
    from xpeft.cli.demo import Server, serve_until_interrupted

    def server(script: str) -> Server:
        proc = subprocess.Popen([sys.executable, "-c", script])
        return Server(proc, "http://127.0.0.1:9", tmp_path / "server.log")

    running = server("import time; time.sleep(60)")
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    # what Ctrl-C does to the demo process: SIGINT, which interrupts its wait for the server
    threading.Timer(0.5, signal.pthread_kill, (main_thread, signal.SIGINT)).start()
    serve_until_interrupted(running, "t" * 32)
    out = capsys.readouterr().out
    assert "curl -s -X POST http://127.0.0.1:9/profiles/topic/predict" in out and out.endswith("stopping\n")
    assert running.proc.poll() is None
    running.stop()
    assert running.proc.poll() is not None

    serve_until_interrupted(server("pass"), "t" * 32)
    assert capsys.readouterr().out.endswith("the server stopped\n")
    (tmp_path / "server.log").write_text("boom\n")
    with pytest.raises(XPeftError) as err:
        serve_until_interrupted(server("raise SystemExit(3)"), "t" * 32)
    assert (
        err.value.code == "server_failed" and "status 3" in err.value.message and "boom" in err.value.message
    )
