"""One million profiles in one Redis: memory per profile, listing and scanning time, replica start-up.

    python -m bench.scale.run                  # 1,000,000 profiles (about 5 min on 2 cores, ~4 GB of
                                               #   RAM for Redis) -> bench/scale/results/scale.json and
                                               #   the generated section of docs/DEPLOYMENT.md
    python -m bench.scale.run --quick          # 20,000 profiles -> runs/scale-quick.json
    python -m bench.scale.run --profiles 300000   # where the machine cannot hold a million

A private redis-server (its own port and folder, no persistence) is filled through the store's
own write path: ``RedisStore``'s put script with the arguments ``RedisStore.put`` builds, sent
in pipelines of ``--batch`` calls (one round trip per batch instead of per profile). A set of
``--distinct`` random hard profiles (MiniLM default bank, each validated once by the PUT
handler's own check) is stored under a million ids. Before the numbers, one profile written by
``RedisStore.put`` and one written by the pipelined path are compared field by field. Then:
Redis ``used_memory`` per profile, ``MEMORY USAGE`` of sampled records, paging through the ids
with ``RedisStore.list`` (100 pages of 1,000 spread over the ids; the full listing is
estimated from them), a full ``SCAN`` of the key space, and a fresh ``xpeft serve`` replica on
that store: seconds until ``/readyz`` answers 200, its first page of ``GET /profiles`` and its
first predictions of never-seen profiles.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from bench.common.runs import hardware
from bench.common.server import rss_bytes, saved_minilm_bank
from bench.scale.fill import fill, list_pages, log, make_payloads, profile_id, replica
from testsupport.processes import RedisServer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


async def same_record(store, meta: dict, data: bytes, meta_json: str) -> dict:
    """One id through ``RedisStore.put``, one through the pipelined path: equal fields, or we stop."""
    await store.put("check-put", data, meta)
    pipe = store._redis.pipeline(transaction=False)
    from xpeft.server.stores.base import now
    from xpeft.server.stores.redis_store import condition_args

    await store._put(
        keys=[store.key("check-pipe"), store.ids_key, store.seq_key],
        args=["check-pipe", data, meta_json, repr(now()), store.channel, *condition_args(None)],
        client=pipe,
    )
    await pipe.execute()
    a = await store._redis.hgetall(store.key("check-put"))
    b = await store._redis.hgetall(store.key("check-pipe"))
    varying = {b"version", b"created_at", b"updated_at"}
    if set(a) != set(b) or any(a[k] != b[k] for k in a if k not in varying):
        raise SystemExit("the pipelined path does not write what RedisStore.put writes; fix bench/scale")
    got = await store.get("check-pipe")
    assert got is not None and got.data == data and got.meta == meta
    for pid in ("check-put", "check-pipe"):
        await store.delete(pid)
    return {"fields": sorted(k.decode() for k in a), "identical_except": sorted(k.decode() for k in varying)}


def scan_all(url: str, prefix: str) -> dict:
    import redis

    client = redis.Redis.from_url(url)
    began = time.perf_counter()
    keys = sum(1 for _ in client.scan_iter(match="{" + prefix + "}:profile:*", count=10_000))
    seconds = time.perf_counter() - began
    client.close()
    return {"keys": keys, "seconds": seconds, "count_hint": 10_000}


def memory(url: str, store, ids: list[str]) -> dict:
    import redis

    client = redis.Redis.from_url(url)
    per_key = [int(client.memory_usage(store.key(i), samples=0) or 0) for i in ids]
    index = int(client.memory_usage(store.ids_key, samples=0) or 0)
    info = client.info("memory")
    client.close()
    return {
        "used_memory": int(info["used_memory"]),
        "used_memory_rss": int(info["used_memory_rss"]),
        "hash_bytes_mean": sum(per_key) / max(1, len(per_key)),
        "index_bytes": index,
        "sampled": len(ids),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="20,000 profiles, no doc")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="over a local 3-master Redis Cluster, then a failover -> results/scale-cluster.json",
    )
    parser.add_argument("--profiles", type=int, help="how many (default 1,000,000; 20,000 with --quick)")
    parser.add_argument("--distinct", type=int, default=1000, help="distinct profile files under the ids")
    parser.add_argument("--batch", type=int, default=1000, help="put calls per pipeline")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--doc", type=Path, help="doc to fill (default docs/DEPLOYMENT.md; none with --quick)"
    )
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        parser.error("redis-server is not installed")
    count = args.profiles or (20_000 if args.quick else 1_000_000)
    if count < 1 or args.distinct < 1 or args.batch < 1:
        parser.error("--profiles, --distinct and --batch must be positive")
    out = args.out or (REPO / "runs" / "scale-quick.json" if args.quick else HERE / "results" / "scale.json")
    doc = args.doc or (None if args.quick else REPO / "docs" / "DEPLOYMENT.md")

    from bench.common.runs import load_texts
    from xpeft.server.stores.redis_store import RedisStore

    started = time.perf_counter()
    if args.cluster:
        from bench.scale.cluster_run import main_cluster

        main_cluster(args, count, started)
        return
    work = Path(tempfile.mkdtemp(prefix="xpeft-scale-"))
    redis_server = RedisServer()
    try:
        bank, bank_path = saved_minilm_bank(work, 100)
        distinct = min(args.distinct, count)
        payloads, metas = make_payloads(bank, distinct)
        prefix = f"xpeft-scale-{uuid.uuid4().hex[:8]}"

        async def phase() -> dict:
            store = RedisStore(redis_server.url, prefix=prefix, timeout_s=60.0)
            try:
                check = await same_record(store, metas[0], *payloads[0])
                import redis as sync_redis

                before = int(sync_redis.Redis.from_url(redis_server.url).info("memory")["used_memory"])
                fill_s = await fill(store, count, payloads, args.batch)
                sample = [profile_id(i) for i in random.Random(0).sample(range(count), min(1000, count))]
                mem = memory(redis_server.url, store, sample)
                listing = await list_pages(store, count, 1000, min(100, -(-count // 1000)))
                return {
                    "check": check,
                    "fill_s": fill_s,
                    "memory": mem,
                    "used_memory_before": before,
                    "list": listing,
                }
            finally:
                await store.close()

        measured = asyncio.run(phase())
        stored_delta = measured["memory"]["used_memory"] - measured["used_memory_before"]
        measured["memory"]["used_memory_per_profile"] = stored_delta / count
        measured["memory"]["bytes_per_profile_sampled"] = (
            measured["memory"]["hash_bytes_mean"] + measured["memory"]["index_bytes"] / count
        )
        log(f"{count:,} stored in {measured['fill_s']:.1f} s; {stored_delta / count:,.0f} B per profile")
        scan = scan_all(redis_server.url, prefix)
        log(f"a page of ids in {measured['list']['page_ms_mean']:.0f} ms, scanned in {scan['seconds']:.1f} s")
        texts, _ = load_texts("")
        serving = replica(bank_path, redis_server.url, prefix, work, count, texts)
        log(f"replica ready in {serving['ready_s']:.1f} s")
        redis_rss = rss_bytes(redis_server.proc.pid) if redis_server.proc is not None else {}
    finally:
        redis_server.close()
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python -m bench.scale.run"
        + (" --quick" if args.quick else "")
        + (f" --profiles {args.profiles}" if args.profiles else ""),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hardware(),
        "config": {
            "profiles": count,
            "distinct": distinct,
            "batch": args.batch,
            "xpm_bytes": len(payloads[0][0]),
        },
        **measured,
        "scan": scan,
        "replica": serving,
        "redis_rss": redis_rss,
        "duration_s": time.perf_counter() - started,
    }
    from bench.common.docs import save
    from bench.scale.report import write_section

    save(result, out, doc, write_section, log)


if __name__ == "__main__":
    main()
