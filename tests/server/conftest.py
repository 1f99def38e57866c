"""Fixtures the server tests share beyond tests/conftest.py's (the encoder, banks, Redis and the
session's ``xpeft serve`` processes): the offline model, a module's own pair of servers (one on
Redis, one on SQLite), nginx on loopback, stand-in replicas.

The folders group the tests by role: ``http/`` the API over HTTP and in process, ``serving/`` the
model path inside a replica (batcher, worker, caches, slot pool, memory), ``stores/`` the profile
stores and replicas sharing one, ``observability/`` logs, metrics and traces, ``deploy/`` the
deployment files (compose, Kubernetes, nginx), ``training/`` training as a service.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testsupport.nginx import Nginx, nginx_binary, render
from testsupport.processes import ServerProcess, drop_prefix, free_port, running
from xpeft.adapters.bank import AdapterBank
from xpeft.adapters.encoder import AdapterEncoder
from xpeft.engine.runtime import MultiProfileModel


@pytest.fixture(scope="module")
def offline(encoder: AdapterEncoder, bank: AdapterBank) -> MultiProfileModel:
    """The offline API's model on the session's encoder and bank: what served answers must equal,
    and the model an in-process app is given. One per test module."""
    return MultiProfileModel(encoder, bank)


@dataclass
class ServerPair:
    """Two ``xpeft serve`` processes a test module owns, one per store kind."""

    r: ServerProcess  # the shared test Redis, under a fresh prefix
    s: ServerProcess  # an embedded SQLite file of its own
    redis_url: str
    prefix: str
    sqlite_path: Path
    logs: Path  # both servers' logs, and room for other processes' (a worker's)


@pytest.fixture(scope="module")
def server_pair(
    redis_url: str, bank_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerPair]]:
    """``server_pair(name, env, redis_env={}, sqlite_env={}) -> ServerPair``: starts ``{name}-r`` on
    the test Redis under a fresh ``xpeft-{name}-...`` prefix and ``{name}-s`` on a SQLite file of
    its own, both with ``env`` plus their own extra settings, together, and waits for both. At the
    end of the module both stop and the prefix's keys are deleted."""
    with ExitStack() as stack:

        def start(
            name: str,
            env: dict[str, str],
            redis_env: dict[str, str] | None = None,
            sqlite_env: dict[str, str] | None = None,
        ) -> ServerPair:
            logs = tmp_path_factory.mktemp(f"{name}-logs")
            prefix = f"xpeft-{name}-{uuid.uuid4().hex[:10]}"
            sqlite_path = tmp_path_factory.mktemp(f"{name}-sqlite") / "s.sqlite3"
            r = ServerProcess(
                f"{name}-r",
                {"XPEFT_REDIS_URL": redis_url, "XPEFT_REDIS_PREFIX": prefix, **env, **(redis_env or {})},
                bank_path,
                logs / "r.log",
            )
            s = ServerProcess(
                f"{name}-s",
                {"XPEFT_SQLITE_PATH": str(sqlite_path), **env, **(sqlite_env or {})},
                bank_path,
                logs / "s.log",
            )
            stack.callback(drop_prefix, redis_url, prefix)
            stack.enter_context(running(r, s))
            return ServerPair(r, s, redis_url, prefix, sqlite_path, logs)

        yield start


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """``nginx(upstreams, **render_options) -> Nginx``: the repository's docker/nginx.conf rendered
    for loopback (``testsupport.nginx.render``: ``rate``, ``balance``, ``max_conns``) in front of
    the given ports, started; each in a folder of its own (its own access log). All are stopped at
    the end; a test may stop one sooner. Skips where nginx is not installed."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (Debian's nginx-light is enough; CI installs it)")
    started: list[Nginx] = []

    def start(upstreams: list[int], **options: Any) -> Nginx:
        folder = tmp_path / f"nginx-{len(started)}"
        folder.mkdir()
        port = free_port()
        started.append(Nginx(render(folder, upstreams, port, **options), port).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def stand_in() -> Iterator[Callable[..., http.server.ThreadingHTTPServer]]:
    """``stand_in(status=200, body=None, delay_s=0.0)``: a replica stand-in on a free loopback port
    that answers every request (any method) with ``status`` and the JSON ``body`` after
    ``delay_s``; ``body=None`` answers ``{"port": <its port>}``, so a caller sees who answered.
    All are shut down at the end."""
    made: list[http.server.ThreadingHTTPServer] = []

    def start(
        status: int = 200, body: dict | None = None, delay_s: float = 0.0
    ) -> http.server.ThreadingHTTPServer:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(delay_s)
                answer = {"port": self.server.server_address[1]} if body is None else body
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer  # noqa: N815 - the stdlib's names

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        made.append(server)
        return server

    yield start
    for server in made:
        server.shutdown()
        server.server_close()
