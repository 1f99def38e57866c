"""Processes the tests and the benchmarks own: private redis-servers and ``xpeft serve`` children
on loopback, with what a fault needs (stop, kill, pause, SIGTERM, RSS), and :func:`running`, which
starts a group of servers together and stops them all.

Every process here is started by us and signalled by its pid, never by name. Redis instances
are private (their own free port and folder): the machine's shared Redis is never stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

STARTUP_TIMEOUT_S = 180.0


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header of a bearer token."""
    return {"Authorization": f"Bearer {token}"}


def drop_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key of a test's or run's own prefix (``{prefix}``-tagged keys and the like)."""
    import redis  # noqa: PLC0415 - only the Redis runs need it

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def memory(pid: int) -> dict[str, int]:
    """``rss`` (VmRSS) and ``peak`` (VmHWM, the high-water mark) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) * 1024
    return out


class RedisServer:
    """A redis-server of our own on a free loopback port.

    ``aof=True`` runs it as docker-compose.yml does (``--appendonly yes --appendfsync everysec``),
    so :meth:`start` after :meth:`stop` or :meth:`kill` reloads every acknowledged write from
    the append-only file in the same folder. Without it, a restart is empty.
    """

    def __init__(self, port: int | None = None, aof: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise FileNotFoundError("redis-server is not installed")
        self.port = port or free_port()
        self.aof = aof
        self.dir = tempfile.mkdtemp(prefix="xpeft-redis-")
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> float:
        """Start (again); returns the seconds until it answered (AOF replay included)."""
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else ["--appendonly", "no"]
        )
        began = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not redis_answers(self.url):
            if time.monotonic() - began > timeout or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return time.monotonic() - began

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits."""
        self._signal(signal.SIGTERM)
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash. Acknowledged writes are in the AOF already (Redis writes it before replying)."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung store or a dead network."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ServerProcess:
    """One ``xpeft serve`` process on loopback; settings as ``XPEFT_*`` variables, output in a log file."""

    name: str
    env: dict[str, str]
    bank_path: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    terminated: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("XPEFT_")}
        # torch backend: tests compare served answers with the offline (torch) model; pass XPEFT_BACKEND to change
        env.update(
            {"XPEFT_TORCH_THREADS": "1", "XPEFT_LOG_LEVEL": "warning", "XPEFT_BACKEND": "torch", **self.env}
        )
        cmd = [
            sys.executable,
            "-m",
            "xpeft.cli",
            "serve",
            "--bank",
            str(self.bank_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.terminated = False
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

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
        raise RuntimeError(f"server {self.name} did not become ready; log:\n{self.log_text()[-5000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        return memory(self.pid)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> float:
        """SIGTERM now; the monotonic time it was sent."""
        assert self.proc is not None
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.terminated = True
        return sent

    def stop(self) -> None:
        """SIGTERM unless :meth:`terminate` sent it already, wait for the exit; SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            if not self.terminated:
                self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self.log.close()


@contextmanager
def running(*servers: ServerProcess) -> Iterator[tuple[ServerProcess, ...]]:
    """Start every server, then wait for each to be ready (startup is the slow part, so they load
    together). On exit, SIGTERM to all that still run at once (they drain in parallel), then wait
    for each; a server a test already stopped or killed (``proc`` is ``None``) is left alone."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            if server.alive() and not server.terminated:
                server.terminate()
        for server in servers:
            if server.proc is not None:
                server.stop()
