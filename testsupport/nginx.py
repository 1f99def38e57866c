"""docker/nginx.conf rendered for loopback and run as a real nginx (Debian's), for tests and benchmarks.

The rendered copy differs from the repository's file only in what loopback needs: replica
addresses (``xpeft-N:8000`` becomes the N-th given port), the listen address, log paths (plus an
access log that records the profile id, the replica that answered and the status), and on
request a balancing method, a ``max_conns`` bound or a small client rate for quick tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CONF = Path(__file__).resolve().parents[1] / "docker" / "nginx.conf"
HASH = "hash $profile_id consistent;"
LOG_FORMAT = "log_format affinity '$profile_id $upstream_addr $status $request_time';"


def nginx_binary() -> str | None:
    """Debian installs nginx in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def render(
    tmp: Path,
    replicas: list[int],
    port: int,
    *,
    rate: str | None = None,
    balance: str = "hash",
    max_conns: int | None = None,
) -> Path:
    """Write the loopback copy of docker/nginx.conf into ``tmp``; returns its path.

    ``balance="least_conn"`` replaces the profile hash in every upstream block (the comparison the
    affinity benchmark makes); ``max_conns`` replaces the bound of the prediction upstream.
    """
    if balance not in ("hash", "least_conn"):
        raise ValueError("balance must be 'hash' or 'least_conn'")
    conf = CONF.read_text()

    def address(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        if index >= len(replicas):
            raise ValueError(f"the config names replica xpeft-{index + 1}; give {index + 1} ports")
        return f"server 127.0.0.1:{replicas[index]}"

    conf = re.sub(r"server xpeft-(\d+):8000", address, conf)
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};").replace("worker_processes auto;", "")
    conf = conf.replace(
        "access_log /dev/stdout;", f"{LOG_FORMAT}\n    access_log {tmp / 'access.log'} affinity;"
    )
    conf = conf.replace("/dev/stderr", str(tmp / "error.log"))
    if balance == "least_conn":
        conf = conf.replace(HASH, "least_conn;")
    if max_conns is not None:
        conf = conf.replace("max_conns=40;", f"max_conns={max_conns};")
    if rate:
        conf = re.sub(r"rate=\S+;", f"rate={rate};", conf).replace("burst=400", "burst=1")
    path = tmp / "nginx.conf"
    path.write_text(conf)
    return path


@dataclass
class Nginx:
    """One nginx master (and its workers) of ours, started on a rendered config and stopped by pid."""

    conf: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def prefix(self) -> Path:
        return self.conf.parent

    def _args(self, *extra: str) -> list[str]:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian's nginx-light is enough)")
        return [binary, "-c", str(self.conf), "-p", str(self.prefix), *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` on the rendered file."""
        return subprocess.run(
            self._args("-t", "-g", f"pid {self.prefix}/nginx.pid;"), capture_output=True, text=True
        )

    def start(self, timeout: float = 10.0) -> Nginx:
        checked = self.check()
        if checked.returncode != 0:
            raise RuntimeError(f"nginx refused the rendered config:\n{checked.stderr}")
        self.proc = subprocess.Popen(self._args("-g", f"daemon off; pid {self.prefix}/nginx.pid;"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(self.url, timeout=1, trust_env=False)
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> list[Entry]:
        """Every request nginx logged so far (the access log is written as each request ends)."""
        path = self.prefix / "access.log"
        return [Entry.parse(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_log(self, count: int, timeout: float = 10.0) -> list[Entry]:
        """The log once it holds at least ``count`` lines: nginx writes a request's line after the
        client has its answer, so a reader right after the last answer can be a line short."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.log()
            if len(entries) >= count or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)


@dataclass
class Entry:
    """One access-log line: profile id ('-' when none), replica ports tried in order, status."""

    profile_id: str
    upstreams: list[str] = field(default_factory=list)
    status: int = 0
    seconds: float = 0.0

    @classmethod
    def parse(cls, line: str) -> Entry:
        profile_id, rest = line.split(" ", 1)
        # $upstream_addr lists every try ("a, b"; "a : b" across an internal redirect).
        addresses, status, seconds = rest.rsplit(" ", 2)
        tried = [a for a in re.split(r"[ ,:]+", addresses) if a.isdigit()]
        return cls(profile_id, tried, int(status), float(seconds))

    @property
    def replica(self) -> str | None:
        """The port of the replica that answered (the last one tried)."""
        return self.upstreams[-1] if self.upstreams else None


def shares(entries: list[Entry]) -> dict[str, float]:
    """Share of the answered requests per replica port."""
    counts = Counter(e.replica for e in entries if e.replica is not None)
    total = sum(counts.values())
    return {port: n / total for port, n in sorted(counts.items())} if total else {}
