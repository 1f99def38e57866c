"""Fixtures for the server tests: a real Redis, real uvicorn processes on loopback, profile bytes.

Redis: ``XPEFT_TEST_REDIS_URL`` when set, else 127.0.0.1:6379 when it answers, else a
``redis-server`` started here on a free port. Every session uses its own key prefix, so parallel
or earlier runs never collide, and deletes its keys at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from xpeft.adapters.bank import AdapterBank
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile

ADMIN = "admin-token-for-tests"
READER = "reader-token-for-tests"
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5).ping())
    except (redis.RedisError, OSError):
        return False


class RedisServer:
    """A redis-server process of our own (no persistence), e.g. one that a test may stop."""

    def __init__(self, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (CI installs it)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="xpeft-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _answers(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("XPEFT_TEST_REDIS_URL")
    if url:
        yield url
        return
    if _answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    server = RedisServer()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix for this session; every key under it is deleted at the end."""
    prefix = f"xpeft-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{{{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def bank_path(bank: AdapterBank, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bank.save(tmp_path_factory.mktemp("bank") / "bank.safetensors")


@pytest.fixture(scope="session")
def profile_bytes(bank: AdapterBank):
    """``profile_bytes(seed, kind="hard", labels=None)``: a random valid profile's .xpm bytes."""

    def make(seed: int, kind: str = "hard", labels: list[str] | None = None) -> bytes:
        return xpm.encode(random_profile(bank, kind, seed=seed, labels=labels))

    return make


# -- server processes -----------------------------------------------------------------------
@dataclass
class ServerProcess:
    """One ``xpeft serve`` process on loopback."""

    name: str
    env: dict[str, str]
    bank_path: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
        env.update({"XPEFT_TORCH_THREADS": "1", "XPEFT_LOG_LEVEL": "warning", **self.env})
        cmd = [sys.executable, "-m", "xpeft.profiles.cli", "serve", "--bank", str(self.bank_path),
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} did not become ready; log:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.log.close()


@dataclass
class Cluster:
    """The servers every HTTP test shares (started together: startup is the slow part)."""

    a: ServerProcess  # Redis, admin token
    b: ServerProcess  # a second replica on the same Redis and prefix
    c: ServerProcess  # embedded SQLite store, API token for reads, small limits
    d: ServerProcess  # a private Redis that a test stops and restarts
    d_redis: RedisServer
    sqlite_path: Path


@pytest.fixture(scope="session")
def cluster(redis_url: str, redis_prefix: str, bank_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("server-logs")
    shared = {"XPEFT_REDIS_URL": redis_url, "XPEFT_REDIS_PREFIX": redis_prefix, "XPEFT_ADMIN_TOKEN": ADMIN,
              "XPEFT_MAX_WAIT_MS": "10"}
    sqlite_path = tmp_path_factory.mktemp("sqlite") / "profiles.sqlite3"
    d_redis = RedisServer()
    servers = [
        ServerProcess("a", dict(shared), bank_path, logs / "a.log"),
        ServerProcess("b", dict(shared), bank_path, logs / "b.log"),
        ServerProcess("c", {"XPEFT_SQLITE_PATH": str(sqlite_path), "XPEFT_ADMIN_TOKEN": ADMIN,
                            "XPEFT_API_TOKEN": READER, "XPEFT_MAX_INPUTS": "4", "XPEFT_MAX_TEXT_CHARS": "300",
                            "XPEFT_MAX_PROFILE_BYTES": "65536", "XPEFT_MAX_REQUEST_BYTES": "4096",
                            "XPEFT_MAX_QUEUE": "2", "XPEFT_MAX_BATCH_SIZE": "4", "XPEFT_MAX_WAIT_MS": "0",
                            "XPEFT_MAX_LIST_LIMIT": "50", "XPEFT_LOG_LEVEL": "info"},
                      bank_path, logs / "c.log"),
        ServerProcess("d", {"XPEFT_REDIS_URL": d_redis.url, "XPEFT_STORE_TIMEOUT_S": "0.5"}, bank_path,
                      logs / "d.log"),
    ]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield Cluster(*servers, d_redis=d_redis, sqlite_path=sqlite_path)
    finally:
        for server in servers:
            server.stop()
        d_redis.stop()


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="session")
def reader_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {READER}"}
