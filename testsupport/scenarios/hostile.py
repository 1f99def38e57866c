"""Hostile-client cases shared by tests/reliability/test_hostile.py and the long run: a 1 MB
predict body of half a million items, unauthenticated requests that stall their bodies, and
connections that never finish their headers, each with ``/healthz`` probed meanwhile.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

# {"inputs":[0,0,...]}: 500,000 items in about 1 MB, under the default 1 MiB body limit.
HUGE_BODY = b'{"inputs":[' + b"0," * 499_999 + b"0]}"


@dataclass
class HealthWaits:
    """Latencies of ``/healthz`` polled back to back while something else ran."""

    waits_s: list[float] = field(default_factory=list)
    failures: int = 0
    result: Any = None

    @property
    def max_s(self) -> float:
        return max(self.waits_s, default=float("inf"))


def healthz_waits_during(url: str, work: Callable[[], Any], timeout_s: float = 5.0) -> HealthWaits:
    """Run ``work()`` here while a thread polls ``url/healthz``; a probe that fails counts its timeout."""
    out = HealthWaits()
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=timeout_s) as client:
            while not done.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(f"{url}/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                out.waits_s.append(time.perf_counter() - start)
                out.failures += not ok
                time.sleep(0.01)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        out.result = work()
        time.sleep(0.05)
    finally:
        done.set()
        thread.join(timeout_s + 1)
    return out


def open_stalled(port: int, head: bytes, count: int) -> list[socket.socket]:
    """``count`` loopback connections that send ``head`` and then nothing."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(head)
        socks.append(sock)
    return socks


def count_closed(socks: list[socket.socket], within_s: float) -> int:
    """How many of ``socks`` the server closed within ``within_s`` seconds (from now)."""
    deadline = time.monotonic() + within_s
    closed = 0
    for sock in socks:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            closed += sock.recv(1024) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
    return closed


def _first_bytes(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(12)
    except (TimeoutError, ConnectionResetError):
        return b""


def run_hostile(
    url: str, port: int, profile_id: str, token: str, header_timeout_s: float, rounds: int = 20
) -> dict:
    """The long run's case: the huge body ``rounds`` times one after the other (refusal time), then
    4 at once for ``rounds`` rounds with ``/healthz`` probed throughout, then 64 stalled
    unauthenticated predictions (time to their 401s), then 200 connections that never finish
    their headers (how many the server closed by the deadline plus 3 s)."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    path = f"/profiles/{profile_id}/predict"
    with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        client.post(path, content=HUGE_BODY)  # warm the connection
        refusal_s, statuses = [], set()
        for _ in range(rounds):
            start = time.perf_counter()
            response = client.post(path, content=HUGE_BODY)
            refusal_s.append(time.perf_counter() - start)
            statuses.add((response.status_code, response.json().get("error")))

    def burst() -> None:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as c:
            for _ in range(rounds):
                threads = [
                    threading.Thread(target=c.post, args=(path,), kwargs={"content": HUGE_BODY})
                    for _ in range(4)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

    waits = healthz_waits_during(url, burst)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        'Content-Length: 100000\r\n\r\n{"inputs": ["'
    ).encode()
    start = time.monotonic()
    socks = open_stalled(port, head, 64)
    try:
        answered = sum(_first_bytes(s, 5.0).startswith(b"HTTP/1.1 401") for s in socks)
        stalled_s = time.monotonic() - start
    finally:
        for s in socks:
            s.close()
    slow = open_stalled(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", 200)
    start = time.monotonic()
    try:
        closed = count_closed(slow, header_timeout_s + 3.0)
        closed_s = time.monotonic() - start
    finally:
        for s in slow:
            s.close()
    return {
        "slow_headers": {
            "connections": len(slow),
            "closed": closed,
            "seconds": closed_s,
            "header_timeout_s": header_timeout_s,
        },
        "body_bytes": len(HUGE_BODY),
        "body_items": HUGE_BODY.count(b",") + 1,
        "answers": sorted(f"{status} {code}" for status, code in statuses),
        "refusal_ms": {
            "median": 1000 * statistics.median(refusal_s),
            "max": 1000 * max(refusal_s),
            "n": len(refusal_s),
        },
        "healthz_during_burst": {
            "probes": len(waits.waits_s),
            "failures": waits.failures,
            "max_ms": 1000 * waits.max_s,
            "median_ms": 1000 * statistics.median(waits.waits_s) if waits.waits_s else None,
            "huge_bodies_sent": 4 * rounds,
        },
        "stalled_unauthenticated": {"sent": len(socks), "answered_401": answered, "seconds": stalled_s},
    }
