"""Recorded HTTP traffic: every request's kind, start and end time, status and error code.

The scenarios judge a fault by what each request saw, sorted by when it started relative to the
fault, so one record per request (not a running average) is what they keep.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx


def check_loopback(url: str) -> None:
    """The scenarios only ever talk to servers on this machine."""
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"refusing to send traffic to {host}: loopback only")


@dataclass
class Outcome:
    """One request: what was asked, when (seconds since the recorder began), and what came back."""

    kind: str
    target: str
    start: float
    end: float
    status: int  # 0: no HTTP answer (connection refused, client timeout)
    code: str | None = None  # the JSON `error` field, or the exception's name when status is 0
    version: int | None = None
    body: dict | None = field(default=None, repr=False)

    @property
    def latency(self) -> float:
        return self.end - self.start


class Recorder:
    """Sends requests through one httpx client and keeps an :class:`Outcome` for each."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
        max_connections: int = 100,
        keepalive: bool = True,
        t0: float | None = None,
    ) -> None:
        """``keepalive=False``: a new connection per request; ``t0``: share another recorder's clock."""
        check_loopback(base_url)
        self.t0 = time.monotonic() if t0 is None else t0
        self.outcomes: list[Outcome] = []
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections if keepalive else 0
        )
        self.client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits)

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def request(self, kind: str, method: str, path: str, target: str = "", **kwargs) -> Outcome:
        start = self.now()
        try:
            response = await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            outcome = Outcome(kind, target, start, self.now(), 0, type(exc).__name__)
        else:
            try:
                body = response.json()
            except ValueError:
                body = None
            body = body if isinstance(body, dict) else None
            outcome = Outcome(
                kind,
                target,
                start,
                self.now(),
                response.status_code,
                body.get("error") if body else None,
                body.get("version") if body else None,
                body,
            )
        self.outcomes.append(outcome)
        return outcome

    async def close(self) -> None:
        await self.client.aclose()


def status_counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    """``{"200": n, "503 store_unavailable": m, ...}``: status with the error code where there is one."""
    counts = Counter(f"{o.status} {o.code}" if o.code else str(o.status) for o in outcomes)
    return dict(sorted(counts.items()))


def latency_summary(outcomes: Iterable[Outcome]) -> dict[str, float]:
    values = sorted(o.latency for o in outcomes)
    if not values:
        return {"n": 0}

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)

    return {
        "n": len(values),
        "p50_ms": pick(0.5),
        "p99_ms": pick(0.99),
        "max_ms": round(values[-1] * 1000, 1),
    }


async def until(deadline: float, clock, interval: float = 0.0):
    """Async iterator: yields until ``clock() >= deadline``, pausing ``interval`` between turns."""
    while clock() < deadline:
        yield
        await asyncio.sleep(interval)
