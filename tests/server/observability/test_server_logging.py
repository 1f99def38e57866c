"""A real ``xpeft serve`` with XPEFT_LOG_FORMAT=json: every line it writes is one JSON object, the
access log included, each carrying its request's id, and the access log still redacts queries."""

from __future__ import annotations

import json
import time

import httpx

from testsupport.processes import ServerProcess, running

ADMIN = "admin-token-for-logging-test"


def test_json_logs_of_a_real_server(bank_path, tmp_path) -> None:
    server = ServerProcess(
        "json-logs",
        {
            "XPEFT_SQLITE_PATH": str(tmp_path / "p.sqlite3"),
            "XPEFT_ADMIN_TOKEN": ADMIN,  # no protected-mode banner (plain text on stderr by design)
            "XPEFT_LOG_FORMAT": "json",
            "XPEFT_LOG_LEVEL": "info",
        },
        bank_path,
        tmp_path / "server.log",
    )
    secret = "query-secret-9d2e4b"
    with running(server):
        with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
            listed = client.get(
                "/profiles",
                params={"token": secret, "limit": "5"},
                headers={"X-Request-ID": "json-log-1", "Authorization": f"Bearer {ADMIN}"},
            )
            assert listed.status_code == 200 and listed.headers["x-request-id"] == "json-log-1"
            missing = client.get("/profiles/none", headers={"X-Request-ID": "json-log-2"})
            assert missing.status_code == 404
        deadline = time.monotonic() + 10
        while "json-log-2" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    text = (tmp_path / "server.log").read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # each line is JSON
    assert secret not in text
    access = {line["request_id"]: line for line in lines if line["logger"] == "uvicorn.access"}
    listed_line = access["json-log-1"]
    assert listed_line["method"] == "GET" and listed_line["status"] == 200
    assert listed_line["path"] == "/profiles?***&limit=5" and listed_line["level"] == "INFO"
    assert access["json-log-2"]["status"] == 404
    started = [line for line in lines if line["logger"] == "uvicorn.error"]  # uvicorn's own lines too
    assert started and all(line["request_id"] == "-" for line in started)
    assert any(line["logger"] == "xpeft.server" and "model ready" in line["message"] for line in lines)


def test_the_trainer_process_logs_in_the_configured_format(bank_path, tmp_path) -> None:
    """``xpeft worker`` reads XPEFT_LOG_FORMAT as the server does: its lines are JSON objects too."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
    env.update(XPEFT_LOG_FORMAT="json", XPEFT_LOG_LEVEL="info", XPEFT_SQLITE_PATH=str(tmp_path / "w.sqlite3"))
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "xpeft.cli", "worker", "--bank", str(bank_path)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while "trainer ready" not in log.read_text() and time.monotonic() < deadline:
                assert worker.poll() is None, log.read_text()
                time.sleep(0.2)
        finally:
            worker.terminate()
            worker.wait(30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    ready = next(r for r in records if "trainer ready" in r["message"])
    assert ready["logger"] == "xpeft.worker" and ready["level"] == "INFO"
