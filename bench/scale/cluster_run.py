"""``python -m bench.scale.run --cluster``: profiles over a local 3-master Redis Cluster, then a failover.

The cluster (:class:`testsupport.cluster.LocalCluster`, no replicas: the memory goes to masters)
is filled through the cluster store's own put script (``RedisClusterStore``'s, with the arguments
its ``put`` builds) in pipelines; one profile written by ``put`` and one by the pipelined path are
compared first. Measured: each master's share of the profiles, ``used_memory`` per profile over
all masters, ``GET /profiles`` pages from the store, and a fresh ``xpeft serve`` replica in cluster
mode (ready time, first page, first predictions). Then :func:`testsupport.scenarios.failover.run_failover`
on its own cluster with replicas. Compared with the single-node figures of ``scale.json``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import redis

from testsupport.cluster import LocalCluster
from testsupport.processes import RedisServer
from testsupport.scenarios.failover import run_failover

HERE = Path(__file__).resolve().parent


def queue_put(store, pipe, pid: str, data: bytes, meta_json: str) -> None:
    """Exactly ``RedisClusterStore.put``'s script, keys and arguments (no condition), queued on ``pipe``."""
    from xpeft.server.stores.base import now
    from xpeft.server.stores.redis_cluster_store import PUT_SCRIPT
    from xpeft.server.stores.redis_store import condition_args

    tag = store.tag(pid)
    keys = [store.key(pid), f"{tag}:ids", f"{tag}:seq"]
    args = [pid, data, meta_json, repr(now()), store.channel_of(pid), *condition_args(None)]
    pipe.eval(PUT_SCRIPT, len(keys), *keys, *args)


def shares(nodes: LocalCluster, store) -> dict[str, int]:
    """Profiles per master: the sizes of the groups' indexes, summed by the master serving each."""
    counts: dict[str, int] = {}
    for tag in store.tags:
        port = nodes.owner(tag)
        with redis.Redis(port=port) as client:
            counts[str(port)] = counts.get(str(port), 0) + int(client.zcard(f"{tag}:ids"))
    return counts


def used_memory(nodes: LocalCluster) -> int:
    total = 0
    for port in nodes.masters():
        with redis.Redis(port=port) as client:
            total += int(client.info("memory")["used_memory"])
    return total


def main_cluster(args, count: int, started: float) -> None:
    """Run the cluster figures, write ``results/scale-cluster.json`` and its doc section."""
    from bench.common.docs import save
    from bench.common.runs import hardware, load_texts
    from bench.common.server import saved_minilm_bank
    from bench.scale.fill import log, make_payloads
    from bench.scale.report import write_cluster_section

    work = Path(tempfile.mkdtemp(prefix="xpeft-scale-cluster-"))
    try:
        bank, bank_path = saved_minilm_bank(work, 100)
        payloads, metas = make_payloads(bank, min(args.distinct, count))
        texts, _ = load_texts("")
        measured = measure(args, count, work, bank_path, payloads, metas, texts, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python -m bench.scale.run --cluster"
        + (" --quick" if args.quick else "")
        + (f" --profiles {args.profiles}" if args.profiles else ""),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hardware": hardware(),
        "config": {"profiles": count, "distinct": len(payloads), "batch": args.batch, "masters": 3},
        **measured,
        "duration_s": time.perf_counter() - started,
    }
    quick = args.quick
    out = args.out or (
        HERE.parents[1] / "runs" / "scale-cluster-quick.json"
        if quick
        else HERE / "results" / "scale-cluster.json"
    )
    doc = args.doc or (None if quick else HERE.parents[1] / "docs" / "DEPLOYMENT.md")
    save(result, out, doc, write_cluster_section, log)


def measure(args, count: int, work: Path, bank_path: Path, payloads, metas, texts, log) -> dict:
    """The cluster figures (see the module docstring)."""
    from bench.scale.fill import fill, list_pages, replica
    from xpeft.server.stores.redis_cluster_store import RedisClusterStore

    jobs = RedisServer()
    nodes = LocalCluster(masters=3)
    prefix = f"xpeft-scale-{int(time.time())}"
    try:
        url = nodes.url(nodes.masters()[0])

        async def phase() -> dict:
            store = RedisClusterStore(url, prefix=prefix, timeout_s=60.0, wait_replicas=0)
            try:
                await store.put("check-put", payloads[0][0], metas[0])
                pipe = store._cluster.pipeline(transaction=False)
                queue_put(store, pipe, "check-pipe", *payloads[0])
                await pipe.execute()
                a = await store._cluster.hgetall(store.key("check-put"))
                b = await store._cluster.hgetall(store.key("check-pipe"))
                varying = {b"version", b"created_at", b"updated_at"}
                if set(a) != set(b) or any(a[k] != b[k] for k in a if k not in varying):
                    raise SystemExit("the pipelined path does not write what put writes; fix bench/scale")
                for pid in ("check-put", "check-pipe"):
                    await store.delete(pid)
                before = used_memory(nodes)
                fill_s = await fill(store, count, payloads, args.batch, queue=queue_put)
                stored = used_memory(nodes) - before
                listing = await list_pages(store, count, 1000, min(100, -(-count // 1000)))
                return {
                    "fill_s": fill_s,
                    "shares": shares(nodes, store),
                    "used_memory_per_profile": stored / count,
                    "used_memory": used_memory(nodes),
                    "list": listing,
                }
            finally:
                await store.close()

        measured = asyncio.run(phase())
        log(
            f"{count:,} over 3 masters: {measured['shares']}; {measured['used_memory_per_profile']:,.0f} B each"
        )
        env = {
            "XPEFT_REDIS_CLUSTER": "true",
            "XPEFT_JOBS_REDIS_URL": jobs.url,
            "XPEFT_REDIS_WAIT_REPLICAS": "0",
        }
        measured["replica"] = replica(bank_path, url, prefix, work, count, texts, env)
        log(f"cluster-mode replica ready in {measured['replica']['ready_s']:.1f} s")
    finally:
        nodes.close()
    try:
        log("failover: SIGKILL a master under PUT + predict load")
        data = [p[0] for p in payloads[:4]]
        measured["failover"] = run_failover(bank_path, jobs.url, work, data)
    finally:
        jobs.close()
    single_path = HERE / "results" / "scale.json"
    single = json.loads(single_path.read_text()) if single_path.exists() else None
    measured["single_node"] = (
        None
        if single is None
        else {
            "results": "bench/scale/results/scale.json",
            "profiles": single["config"]["profiles"],
            "used_memory_per_profile": single["memory"]["used_memory_per_profile"],
            "page_ms_mean": single["list"]["page_ms_mean"],
            "ready_s": single["replica"]["ready_s"],
        }
    )
    return measured
