"""Store outage under steady load: Redis hangs (SIGSTOP), comes back, then crashes (SIGKILL) and
restarts from its append-only file, while predict and upload traffic keeps running.

What each request saw is recorded and sorted by when it started relative to the faults:

- *hot* predicts hit profiles this replica had cached before the fault;
- *cold* predicts each ask for a profile it has never served (a fresh id from a pool, until one
  succeeds), so they need the store;
- *put* uploads alternate a new id and a new version of the last one.

Afterwards the store itself is read: every acknowledged PUT must be there (same version or a
later one, and the same bytes when the version is the one acknowledged), and no id whose every
upload was refused while Redis was down may exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import redis

from testsupport.processes import RedisServer
from testsupport.scenarios.traffic import Outcome, Recorder, latency_summary, status_counts

TEXT = "a quiet, well made film"


@dataclass
class OutageConfig:
    """Durations in seconds; the CI test uses short ones, the bench longer ones."""

    warm_s: float = 2.0
    pause_s: float = 2.0  # Redis hangs (SIGSTOP)
    gap_s: float = 2.0
    down_s: float = 2.0  # Redis is dead (SIGKILL), then restarted from its AOF
    recovery_s: float = 3.0
    hot_profiles: int = 8
    cold_pool: int = 200
    hot_workers: int = 4
    cold_interval_s: float = 0.1
    put_interval_s: float = 0.1
    put_bodies: int = 16


def _labels(profile_id: str) -> list[str]:
    """Labels unique to one profile: an answer carrying another profile's labels is caught."""
    return [f"{profile_id}:no", f"{profile_id}:yes"]


async def _upload(client: httpx.AsyncClient, profile_id: str, data: bytes, tries: int = 5) -> dict:
    """A setup upload, before any fault: a 503 (the store slower than its 0.5 s timeout on a busy
    machine) is retried; a PUT of the same bytes is safe to repeat."""
    for _ in range(tries - 1):
        response = await client.put(f"/profiles/{profile_id}", content=data)
        if response.status_code != 503:
            break
        await asyncio.sleep(0.2)
    else:
        response = await client.put(f"/profiles/{profile_id}", content=data)
    response.raise_for_status()
    return response.json()


async def run_outage(
    url: str,
    store: RedisServer,
    prefix: str,
    admin_token: str,
    make_profile: Callable[[int, list[str]], bytes],
    server_pid: int,
    config: OutageConfig,
) -> dict:
    """Run the whole timeline against the server at ``url`` (whose store is ``store``); return the record."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    hot = [f"hot-{i}" for i in range(config.hot_profiles)]
    cold = [f"cold-{i}" for i in range(config.cold_pool)]
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as setup:
        for i, profile_id in enumerate(hot + cold):
            await _upload(setup, profile_id, make_profile(i, _labels(profile_id)))
        for profile_id in hot:  # cached on the server from now on
            (await setup.post(f"/profiles/{profile_id}/predict", json={"inputs": [TEXT]})).raise_for_status()
    bodies = [make_profile(10_000 + i, ["w:no", "w:yes"]) for i in range(config.put_bodies)]

    rec = Recorder(url, headers, timeout=30)
    marks: dict[str, float] = {}
    acked: dict[str, list[tuple[int, str]]] = {}  # id -> [(version, sha256)] of 2xx PUTs
    attempted: dict[str, list[Outcome]] = {}
    total = config.warm_s + config.pause_s + config.gap_s + config.down_s + config.recovery_s
    stop_at = [float("inf")]  # set when the last phase starts; the loops end by themselves then

    async def hot_loop(seed: int) -> None:
        rng = random.Random(seed)
        while rec.now() < stop_at[0]:
            profile_id = rng.choice(hot)
            await rec.request(
                "hot", "POST", f"/profiles/{profile_id}/predict", profile_id, json={"inputs": [TEXT]}
            )

    async def cold_loop() -> None:
        pool = iter(cold)
        profile_id = next(pool)
        while rec.now() < stop_at[0]:
            got = await rec.request(
                "cold", "POST", f"/profiles/{profile_id}/predict", profile_id, json={"inputs": [TEXT]}
            )
            if got.status == 200:  # now cached: the next cold request needs another id
                profile_id = next(pool, None)
                if profile_id is None:
                    return
            await asyncio.sleep(config.cold_interval_s)

    async def put_loop() -> None:
        for n in itertools.count():
            if rec.now() >= stop_at[0]:
                return
            profile_id, data = f"w-{n // 2}", bodies[n % len(bodies)]
            got = await rec.request("put", "PUT", f"/profiles/{profile_id}", profile_id, content=data)
            attempted.setdefault(profile_id, []).append(got)
            if 200 <= got.status < 300:
                acked.setdefault(profile_id, []).append((int(got.version), hashlib.sha256(data).hexdigest()))
            await asyncio.sleep(config.put_interval_s)

    async def faults() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(config.warm_s)
        marks["pause"] = rec.now()
        store.pause()
        await asyncio.sleep(config.pause_s)
        store.resume()
        marks["resume"] = rec.now()
        await asyncio.sleep(config.gap_s)
        marks["kill"] = rec.now()
        store.kill()
        await asyncio.sleep(config.down_s)
        marks["restart"] = rec.now()
        marks["aof_replay_s"] = await loop.run_in_executor(None, store.start)
        marks["up"] = rec.now()
        stop_at[0] = rec.now() + config.recovery_s

    began = time.monotonic()
    await asyncio.gather(faults(), cold_loop(), put_loop(), *(hot_loop(i) for i in range(config.hot_workers)))
    await rec.close()
    wall = time.monotonic() - began

    ready = httpx.get(f"{url}/readyz", timeout=10).status_code
    store_check = _check_store(store.url, prefix, acked, attempted, marks)
    return {
        "config": config.__dict__,
        "planned_s": total,
        "wall_s": round(wall, 2),
        "marks": marks,
        "phases": _phases(rec.outcomes, marks),
        "recovery": _recovery(rec.outcomes, marks),
        "consistency_errors": _consistency_errors(rec.outcomes),
        "store": store_check,
        "ready_after": ready,
        "server_pid": server_pid,
        "requests": len(rec.outcomes),
        "outcomes": rec.outcomes,
    }


def phase_of(o: Outcome, marks: dict[str, float]) -> str:
    """By start time: ``before``, ``paused``, ``between``, ``down`` (dead until it answered again), ``after``."""
    if o.start < marks["pause"]:
        return "before"
    if o.start < marks["resume"]:
        return "paused"
    if o.start < marks["kill"]:
        return "between"
    if o.start < marks["up"]:
        return "down"
    return "after"


def _phases(outcomes: list[Outcome], marks: dict[str, float]) -> dict:
    out: dict[str, dict] = {}
    for phase in ("before", "paused", "between", "down", "after"):
        for kind in ("hot", "cold", "put"):
            chosen = [o for o in outcomes if o.kind == kind and phase_of(o, marks) == phase]
            out.setdefault(phase, {})[kind] = {"statuses": status_counts(chosen), **latency_summary(chosen)}
    return out


def _recovery(outcomes: list[Outcome], marks: dict[str, float]) -> dict:
    """Seconds from Redis answering again to the first success of each kind that needs the store."""
    out = {}
    for kind in ("cold", "put"):
        for fault, cleared in (("pause", "resume"), ("kill", "up")):
            ok = [
                o.end
                for o in outcomes
                if o.kind == kind and o.start >= marks[cleared] and 200 <= o.status < 300
            ]
            out[f"{kind}_after_{fault}_s"] = round(min(ok) - marks[cleared], 3) if ok else None
    return out


def _consistency_errors(outcomes: list[Outcome]) -> int:
    """200 answers whose labels are not their own profile's (a cross-wired store read would show here)."""
    errors = 0
    for o in outcomes:
        if o.kind in ("hot", "cold") and o.status == 200:
            scores = o.body["predictions"][0]["scores"] if o.body else {}
            errors += sorted(scores) != sorted(_labels(o.target))
    return errors


def _check_store(url: str, prefix: str, acked: dict, attempted: dict, marks: dict[str, float]) -> dict:
    """Read Redis directly: acknowledged PUTs kept; ids refused while it was dead absent."""
    client = redis.Redis.from_url(url)
    tag = "{" + prefix + "}"
    lost = []
    for profile_id, writes in acked.items():
        version, meta = client.hmget(f"{tag}:profile:{profile_id}", "version", "meta")
        last_version, last_sha = writes[-1]
        kept = version is not None and (
            int(version) > last_version
            or (int(version) == last_version and json.loads(meta)["sha256"] == last_sha)
        )
        if not kept:
            lost.append(profile_id)
    never_acked = [i for i in attempted if i not in acked]
    stored_refused, ambiguous = [], []
    for profile_id in never_acked:
        tries = attempted[profile_id]
        # A request already sent when Redis was killed (or hung) may have been applied: not a refusal we can judge.
        in_doubt = any(
            o.start < marks["up"] and o.end > marks["kill"] and o.start < marks["kill"] for o in tries
        ) or any(
            marks["pause"] <= o.start < marks["resume"] or o.start < marks["pause"] < o.end for o in tries
        )
        exists = client.exists(f"{tag}:profile:{profile_id}")
        if exists and in_doubt:
            ambiguous.append(profile_id)
        elif exists:
            stored_refused.append(profile_id)
    seq = int(client.get(f"{tag}:seq") or 0)
    client.close()
    max_acked = max((v for writes in acked.values() for v, _ in writes), default=0)
    return {
        "acked_puts": sum(len(w) for w in acked.values()),
        "acked_ids": len(acked),
        "lost_acked_ids": lost,
        "refused_ids": len(never_acked),
        "refused_but_stored": stored_refused,
        "unanswered_then_applied": ambiguous,
        "seq": seq,
        "max_acked_version": max_acked,
    }
