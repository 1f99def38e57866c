"""Graceful shutdown: SIGTERM while predictions are in flight.

Requests in flight must finish with 200; requests sent afterwards (each on a new connection, as a
load balancer's would be) must get 503 ``shutting_down`` until the port closes; ``/readyz`` turns
503 while ``/healthz`` stays 200; the process exits with status 0 within a bounded time.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from testsupport.processes import ServerProcess
from testsupport.scenarios.traffic import Recorder, status_counts

TEXT = ("a long and winding review that keeps going about the plot and the cast " * 8)[:500]


async def _in_flight(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        for line in (await client.get("/metrics")).text.splitlines():
            if line.startswith("xpeft_in_flight_requests "):
                return float(line.split(" ")[1])
    return 0.0


async def run_shutdown(
    server: ServerProcess,
    headers: dict[str, str],
    profile_id: str,
    in_flight: int = 10,
    texts: int = 2,
    probe_interval_s: float = 0.05,
    exit_timeout_s: float = 120.0,
) -> dict:
    url = server.url
    work = Recorder(url, headers, timeout=exit_timeout_s, max_connections=in_flight)
    tasks = [
        asyncio.create_task(
            work.request(
                "in_flight",
                "POST",
                f"/profiles/{profile_id}/predict",
                profile_id,
                json={"inputs": [TEXT] * texts},
            )
        )
        for _ in range(in_flight)
    ]
    deadline = time.monotonic() + 10
    while await _in_flight(url) < in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    seen_in_flight = await _in_flight(url)

    loop = asyncio.get_running_loop()
    sent = server.terminate()
    t_term = work.now()
    # New requests, each on a fresh connection, until the port is closed.
    probes = Recorder(url, headers, timeout=10, max_connections=1, keepalive=False, t0=work.t0)
    port_closed = None
    while server.proc is not None and server.proc.poll() is None:
        for kind, method, path, body in (
            ("new_predict", "POST", f"/profiles/{profile_id}/predict", {"inputs": ["x"]}),
            ("readyz", "GET", "/readyz", None),
            ("healthz", "GET", "/healthz", None),
        ):
            got = await probes.request(kind, method, path, json=body)
            if got.status == 0 and port_closed is None:
                port_closed = got.start - t_term
        if port_closed is not None:
            break
        await asyncio.sleep(probe_interval_s)
    await asyncio.gather(*tasks)
    await work.close()
    await probes.close()
    returncode = await loop.run_in_executor(None, server.proc.wait, exit_timeout_s)
    exited = time.monotonic() - sent
    done = [o for o in work.outcomes if o.kind == "in_flight"]
    return {
        "in_flight": in_flight,
        "seen_in_flight": seen_in_flight,
        "in_flight_statuses": status_counts(done),
        "last_in_flight_done_s": round(max(o.end for o in done) - t_term, 3),
        "probes": {
            kind: status_counts([o for o in probes.outcomes if o.kind == kind])
            for kind in ("new_predict", "readyz", "healthz")
        },
        "probe_outcomes": probes.outcomes,
        "port_closed_s": port_closed,
        "exit_s": round(exited, 3),
        "returncode": returncode,
    }
