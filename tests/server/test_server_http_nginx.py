"""docker/nginx.conf, run for real on loopback (Debian's nginx; skipped where it is not installed):
a draining replica's 503 is retried on the other, predictions included; /metrics and the OpenAPI
pages are not served; the version is not announced; a client over its rate gets the JSON 429.

The copy under test differs from the file only in addresses, log paths and (for the rate test)
a small rate, so that the run is quick and touches nothing but loopback.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.reliability.harness import free_port

NGINX = Path(__file__).resolve().parents[2] / "docker" / "nginx.conf"


def _backend(status: int, body: dict) -> http.server.ThreadingHTTPServer:
    """A stand-in replica answering every request with ``status`` and ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815 - the stdlib's names

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def render(tmp: Path, upstreams: list[int], port: int, rate: str | None = None) -> Path:
    conf = NGINX.read_text()
    names = iter(upstreams)
    conf = re.sub(r"server xpeft-\d:8000", lambda _: f"server 127.0.0.1:{next(names)}", conf)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("worker_processes auto;", "")
    conf = conf.replace("/dev/stdout", str(tmp / "access.log")).replace("/dev/stderr", str(tmp / "error.log"))
    if rate:
        conf = re.sub(r"rate=\S+;", f"rate={rate};", conf).replace("burst=400", "burst=1")
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator:
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (Debian's nginx-light is enough)")
    procs: list[subprocess.Popen] = []

    def start(upstreams: list[int], rate: str | None = None) -> str:
        port = free_port()
        conf = render(tmp_path, upstreams, port, rate)
        check = subprocess.run(
            ["nginx", "-t", "-c", str(conf), "-p", str(tmp_path), "-g", f"pid {tmp_path}/nginx.pid;"],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
        procs.append(
            subprocess.Popen(
                [
                    "nginx",
                    "-c",
                    str(conf),
                    "-p",
                    str(tmp_path),
                    "-g",
                    f"daemon off; pid {tmp_path}/nginx.pid;",
                ]
            )
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url, timeout=1)
                return url
            except httpx.TransportError:
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def test_a_draining_replica_is_skipped_for_every_method_and_ops_pages_are_private(nginx) -> None:
    draining = _backend(503, {"error": "shutting_down", "message": "draining"})
    healthy = _backend(200, {"ok": True})
    try:
        url = nginx([draining.server_port, healthy.server_port])
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(6):  # whichever replica nginx picks first
                assert client.post("/profiles/p-1/predict", json={"inputs": ["x"]}).json() == {"ok": True}
                assert client.put("/profiles/p-1", content=b"x").status_code == 200
                assert client.delete("/profiles/p-1").status_code == 200
                assert client.get("/profiles").status_code == 200
            for private in ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
                answer = client.get(private)
                assert answer.status_code == 404 and answer.json()["error"] == "not_found", private
            assert client.get("/healthz").headers["server"] == "nginx"  # no version
    finally:
        draining.shutdown()
        healthy.shutdown()


def test_a_client_over_its_rate_gets_json_429(nginx) -> None:
    healthy = _backend(200, {"ok": True})
    try:
        url = nginx([healthy.server_port, healthy.server_port], rate="1r/s")
        with httpx.Client(base_url=url, timeout=10) as client:
            answers = [client.get("/healthz") for _ in range(6)]
        limited = [a for a in answers if a.status_code == 429]
        assert limited and limited[0].json()["error"] == "overloaded"
        assert limited[0].headers["retry-after"] == "1"
    finally:
        healthy.shutdown()
