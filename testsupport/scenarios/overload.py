"""Overload: many more concurrent clients than one replica can serve, in rounds.

Each round sends a fixed number of predicts from ``concurrency`` closed-loop clients (each sends
its next request when the last is answered, refused or not). Meanwhile a sampler reads the
server's queue depth and requests in flight from ``/metrics`` (always admitted) and its RSS from
``/proc``. What is judged: answers are only 200 or 503 ``overloaded``, refusals come quickly, the
queue and in-flight counts never pass their limits, and RSS stays flat from round to round.
"""

from __future__ import annotations

import asyncio
import itertools

import httpx
from prometheus_client.parser import text_string_to_metric_families

from testsupport.processes import memory
from testsupport.scenarios.traffic import Recorder, latency_summary, status_counts

TEXT = ("an overlong review that goes on about the plot, the actors and the music " * 3)[:200]


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return 0.0


def _server_view(url: str) -> dict[str, float]:
    """Counters for the server's own view: refusals by limit, and time spent in the app per request kind."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "xpeft_overloaded_total":
                out["queue_refusals"] = sample.value
            elif sample.name == "xpeft_admission_refused_total" and labels.get("reason") == "in_flight":
                out["door_refusals"] = sample.value
            elif sample.name.startswith("xpeft_http_request_seconds_") and labels.get("method") == "POST":
                kind = "door" if labels.get("route") == "unmatched" else "predict"
                out[f"{kind}_{sample.name.rsplit('_', 1)[1]}"] = sample.value  # _sum, _count
    return out


def _server_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    mean = {
        kind: round(1000 * d.get(f"{kind}_sum", 0) / d[f"{kind}_count"], 2)
        if d.get(f"{kind}_count")
        else None
        for kind in ("door", "predict")
    }
    return {
        "queue_refusals": int(d.get("queue_refusals", 0)),
        "door_refusals": int(d.get("door_refusals", 0)),
        "server_ms_per_door_refusal": mean["door"],
        "server_ms_per_predict_route": mean["predict"],
    }


async def run_overload(
    url: str,
    pid: int,
    headers: dict[str, str],
    profile_ids: list[str],
    rounds: int = 3,
    requests_per_round: int = 300,
    concurrency: int = 150,
    texts_per_request: int = 4,
    sample_s: float = 0.02,
) -> dict:
    samples: list[dict] = []
    stop = asyncio.Event()

    async def sampler() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while not stop.is_set():
                text = (await client.get("/metrics")).text
                samples.append(
                    {
                        "queue": _gauge(text, "xpeft_queue_depth"),
                        "in_flight": _gauge(text, "xpeft_in_flight_requests"),
                        **memory(pid),
                    }
                )
                await asyncio.sleep(sample_s)

    sampling = asyncio.create_task(sampler())
    before = memory(pid)
    counters_before = _server_view(url)
    per_round = []
    all_outcomes = []
    for round_no in range(rounds):
        rec = Recorder(url, headers, timeout=60, max_connections=concurrency)
        counter = itertools.count()

        async def client(rec: Recorder = rec, counter: itertools.count = counter) -> None:
            while (n := next(counter)) < requests_per_round:
                profile_id = profile_ids[n % len(profile_ids)]
                await rec.request(
                    "predict",
                    "POST",
                    f"/profiles/{profile_id}/predict",
                    profile_id,
                    json={"inputs": [TEXT] * texts_per_request},
                )

        began = rec.now()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = rec.now() - began
        await rec.close()
        ok = [o for o in rec.outcomes if o.status == 200]
        refused = [o for o in rec.outcomes if o.status == 503]
        per_round.append(
            {
                "round": round_no,
                "wall_s": round(wall, 2),
                "statuses": status_counts(rec.outcomes),
                "ok_per_s": round(len(ok) / wall, 1),
                "latency_ok": latency_summary(ok),
                "latency_refused": latency_summary(refused),
                "rss_end": memory(pid)["rss"],
            }
        )
        all_outcomes += rec.outcomes
    stop.set()
    await sampling
    after = memory(pid)
    return {
        "rounds": per_round,
        "requests": len(all_outcomes),
        "statuses": status_counts(all_outcomes),
        "server": _server_delta(counters_before, _server_view(url)),
        "max_queue": max(s["queue"] for s in samples),
        "max_in_flight": max(s["in_flight"] for s in samples),
        "samples": len(samples),
        "rss_before": before["rss"],
        "rss_after": after["rss"],
        "rss_peak_sampled": max(s["rss"] for s in samples),
        "peak_rss_hwm": after["peak"],
        "outcomes": all_outcomes,
    }
