"""What the single-Redis and the Redis Cluster runs share: profile ids and payloads, filling a
store through its own put script, timing its listing, and a fresh replica on the filled store."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import httpx

from bench.common.server import ServerProcess


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def profile_id(i: int) -> str:
    return f"customer-{i:07d}"


async def fill(
    store, count: int, payloads: list[tuple[bytes, str]], batch: int, start: int = 0, queue=None
) -> float:
    """Store ids ``start..count-1`` through the store's put script, ``batch`` calls per pipeline;
    ``queue(store, pipe, id, data, meta)`` queues one (default: the single-node store's script)."""
    from xpeft.server.stores.base import now
    from xpeft.server.stores.redis_store import condition_args

    began = time.perf_counter()
    for first in range(start, count, batch):
        pipe = store._redis.pipeline(transaction=False)
        for i in range(first, min(first + batch, count)):
            data, meta = payloads[i % len(payloads)]
            pid = profile_id(i)
            if queue is not None:
                queue(store, pipe, pid, data, meta)
                continue
            # exactly RedisStore.put's keys and arguments (no condition), queued instead of awaited
            await store._put(
                keys=[store.key(pid), store.ids_key, store.seq_key],
                args=[pid, data, meta, repr(now()), store.channel, *condition_args(None)],
                client=pipe,
            )
        await pipe.execute()
        if (first // batch) % 100 == 0:
            log(f"stored {min(first + batch, count):,} / {count:,}")
    return time.perf_counter() - began


async def list_pages(store, count: int, page: int, pages: int) -> dict:
    """``RedisStore.list`` pages (what ``GET /profiles`` runs) starting at ``pages`` cursors spread
    evenly over the ids; a full listing costs about ``count / page`` such pages."""
    cursors = [None] + [profile_id(k * count // pages) for k in range(1, pages)]
    times, seen = [], 0
    for cursor in cursors:
        t = time.perf_counter()
        records, _ = await store.list(cursor, page)
        times.append(time.perf_counter() - t)
        seen += len(records)
    mean = sum(times) / len(times)
    full_pages = -(-count // page)
    return {
        "page_size": page,
        "pages_timed": len(times),
        "ids_read": seen,
        "page_ms_mean": 1000 * mean,
        "page_ms_max": 1000 * max(times),
        "full_listing_pages": full_pages,
        "full_listing_s_estimate": mean * full_pages,
    }


def replica(
    bank_path: Path, url: str, prefix: str, work: Path, count: int, texts: list[str], env: dict | None = None
) -> dict:
    quiet = {"XPEFT_LOG_LEVEL": "warning", "XPEFT_ACCESS_LOG": "false"}
    server = ServerProcess(bank_path, url, prefix, work, {**quiet, **(env or {})}, "scale")
    server.start()
    try:
        began = time.perf_counter()
        first_page = httpx.get(f"{server.url}/profiles", params={"limit": 100}, timeout=30, trust_env=False)
        page_ms = 1000 * (time.perf_counter() - began)
        assert first_page.status_code == 200, first_page.text
        rng = random.Random(1)
        latencies = []
        for _ in range(10):
            pid = profile_id(rng.randrange(count))
            t = time.perf_counter()
            answer = httpx.post(
                f"{server.url}/profiles/{pid}/predict",
                json={"inputs": [rng.choice(texts)]},
                timeout=60,
                trust_env=False,
            )
            assert answer.status_code == 200, answer.text
            latencies.append(1000 * (time.perf_counter() - t))
        return {
            "ready_s": server.startup_s,
            "first_page_ms": page_ms,
            "cold_predict_ms": sorted(latencies),
            "rss": server.memory(),
        }
    finally:
        server.stop()


def make_payloads(bank, distinct: int) -> tuple[list[tuple[bytes, str]], list[dict]]:
    """``distinct`` random hard profiles: (.xpm bytes, metadata JSON) and the metadata, each
    validated once by the PUT handler's own check (what PUT stores)."""
    from xpeft.profiles import format as xpm
    from xpeft.profiles.synthetic import random_profile
    from xpeft.server.uploads import validate_profile

    payloads, metas = [], []
    for i in range(distinct):
        data = xpm.encode(random_profile(bank, "hard", seed=i))
        meta = validate_profile(data, bank)
        metas.append(meta)
        payloads.append((data, json.dumps(meta, separators=(",", ":"))))
    return payloads, metas
