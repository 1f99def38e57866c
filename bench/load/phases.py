"""The load test's two phases: throughput (HTTP against offline, cold then warm) and memory
(servers' RSS and Redis bytes while profiles are stored)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common.loadgen import PassResult, PlannedRequest, run_pass
from bench.common.runs import (
    Profiles,
    machine_busy,
    profile_id,
)
from bench.common.server import RedisArea, ServerProcess, batch_stats, bulk_put
from bench.common.stats import ZipfSampler, latency_summary, median
from bench.load.config import Config, log, make_plan
from xpeft.adapters.bank import AdapterBank
from xpeft.engine.cache import CachedProfile, FusedCache, VersionFloors
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm
from xpeft.server.settings import Settings
from xpeft.server.stores.redis_store import RedisStore


# -- measuring -------------------------------------------------------------------------------
class Meter:
    """CPU of the server, of this process (the load generator / offline model) and of the whole machine."""

    def __init__(self, server: ServerProcess | None) -> None:
        self.server = server
        self.server_cpu = server.cpu_seconds() if server else 0.0
        self.own_cpu = time.process_time()
        self.busy, self.total = machine_busy()
        self.load_avg = os.getloadavg()[0]

    def done(self, wall_s: float, rows: int) -> dict:
        busy, total = machine_busy()
        server_cpu = (self.server.cpu_seconds() - self.server_cpu) if self.server else 0.0
        own_cpu = time.process_time() - self.own_cpu
        machine = busy - self.busy
        cores = (total - self.total) / wall_s if wall_s else 0.0  # CPUs that the kernel counts
        return {
            "server_cpu_s": server_cpu,
            "load_gen_cpu_s": own_cpu if self.server else 0.0,
            "own_cpu_s": own_cpu,
            "machine_busy_cpu_s": machine,
            "other_processes_cpu_s": max(0.0, machine - server_cpu - own_cpu),
            "machine_cores": cores,
            "load_avg_1m_before": self.load_avg,
            "server_cpu_ms_per_seq": 1000 * server_cpu / rows if rows else 0.0,
            "load_gen_cpu_ms_per_seq": 1000 * own_cpu / rows if rows and self.server else 0.0,
            "own_cpu_ms_per_seq": 1000 * own_cpu / rows if rows else 0.0,
        }


def http_pass(server: ServerProcess, plan: list[PlannedRequest], config: Config, label: str) -> dict:
    before = server.metrics()
    meter = Meter(server)
    result: PassResult = asyncio.run(run_pass(server.url, plan, config.concurrency, config.pass_deadline_s))
    cpu = meter.done(result.wall_s, result.rows_ok)
    stats = batch_stats(before, server.metrics(), result.wall_s)
    out = {
        "label": label,
        "sent": result.sent,
        "ok": result.ok,
        "rows": result.rows_ok,
        "statuses": {str(k): v for k, v in result.statuses.items()},
        "wall_s": result.wall_s,
        "requests_per_s": result.requests_per_s,
        "sequences_per_s": result.sequences_per_s,
        "stopped_by_deadline": result.stopped_by_deadline,
        "latency": latency_summary(result.latencies_s),
        "server_batches": stats,
        "cpu": cpu,
        "rss": server.memory(),
    }
    log(
        f"{label}: {result.ok}/{result.sent} ok in {result.wall_s:.1f} s = {result.sequences_per_s:.1f} seq/s, "
        f"p50 {out['latency']['p50_ms']:.0f} ms p99 {out['latency']['p99_ms']:.0f} ms, "
        f"batches of {stats['mean_rows']:.1f} rows / {stats['mean_distinct_profiles']:.1f} profiles"
    )
    return out


class Offline:
    """The same request sequence without HTTP: decode on first use, the server's fused cache, predict_batch.

    ``ModelWorker.run`` is the server's own batch step (fused-weight cache in front of
    ``MultiProfileModel.predict_batch``); here it runs on this thread, with no event loop,
    no micro-batcher and no HTTP. Decoded profiles are kept like the server's profile cache
    (which holds 10,000 by default: all of them).
    """

    def __init__(self, model: MultiProfileModel, profiles: Profiles, fused_cache_bytes: int) -> None:
        self.model = model
        self.profiles = profiles
        self.worker = ModelWorker(FusedCache(fused_cache_bytes, VersionFloors()))
        self.worker.model = model
        self.decoded: dict[str, CachedProfile] = {}

    def entry(self, pid: str) -> CachedProfile:
        entry = self.decoded.get(pid)
        if entry is None:
            data = self.profiles.get(int(pid[1:]))
            entry = self.decoded[pid] = CachedProfile(pid, 1, xpm.decode(data, self.model.bank))
        return entry

    def run(self, plan: list[PlannedRequest], batch_rows: int, label: str) -> dict:
        """Consecutive requests of ``plan`` in batches of ``batch_rows`` rows (requests are never split)."""
        batches: list[list[PlannedRequest]] = [[]]
        rows = 0
        for req in plan:
            if batches[-1] and rows + len(req.texts) > batch_rows:
                batches.append([])
                rows = 0
            batches[-1].append(req)
            rows += len(req.texts)
        total_rows = sum(len(r.texts) for r in plan)
        meter = Meter(None)
        start = time.perf_counter()
        distinct = []
        for batch in batches:
            jobs = [_OfflineJob(self.entry(r.profile_id), list(r.texts)) for r in batch]
            self.worker.run(jobs)  # type: ignore[arg-type]  # only .entry and .inputs are read
            distinct.append(len({j.entry.id for j in jobs}))
        wall = time.perf_counter() - start
        out = {
            "label": label,
            "rows": total_rows,
            "wall_s": wall,
            "sequences_per_s": total_rows / wall,
            "batch_rows": batch_rows,
            "batches": len(batches),
            "mean_rows": total_rows / len(batches),
            "mean_distinct_profiles": sum(distinct) / len(distinct),
            "mean_batch_ms": 1000 * wall / len(batches),
            "cpu": meter.done(wall, total_rows),
        }
        log(
            f"{label}: {total_rows} rows in {wall:.1f} s = {out['sequences_per_s']:.1f} seq/s "
            f"(batches of {batch_rows} rows / {out['mean_distinct_profiles']:.1f} profiles)"
        )
        return out


@dataclass
class _OfflineJob:
    """What ``ModelWorker.run`` reads from a batcher ``Job``: the profile entry and the inputs (not
    tokenized ahead: the offline run tokenizes in the batch step)."""

    entry: CachedProfile
    inputs: list[str]
    token_ids: None = None


def check_put_identical(
    server: ServerProcess, store: RedisStore, area: RedisArea, profiles: Profiles, token: str, count: int = 3
) -> dict:
    """PUT a few profiles over HTTP under new ids; their stored data and meta must equal the bulk copies."""
    checked = []
    for i in range(count):
        new_id = f"put-check-{i}"
        response = httpx.put(
            f"{server.url}/profiles/{new_id}",
            content=profiles.get(i),
            timeout=30,
            trust_env=False,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        )
        response.raise_for_status()
        bulk = area.client.hmget(store.key(profile_id(i)), "data", "meta")
        put = area.client.hmget(store.key(new_id), "data", "meta")
        checked.append(bulk == put)
    return {"profiles_checked": count, "identical": all(checked), "fields": ["data", "meta"]}


# -- phases ---------------------------------------------------------------------------------
def _fresh_area(config: Config, prefix: str) -> tuple[RedisArea, RedisStore]:
    """The phase's own key prefix, refused when keys are under it already, and a store over it."""
    area = RedisArea(config.redis_url, prefix)
    if area.count_keys():
        raise RuntimeError(f"keys under {prefix} exist already; refusing to touch them")
    return area, RedisStore(config.redis_url, prefix)


def throughput_phase(
    config: Config,
    model: MultiProfileModel,
    profiles: Profiles,
    texts: list[str],
    bank_path: Path,
    workdir: Path,
    run_id: str,
    token: str,
) -> dict:
    prefix = f"xpeft-load-{run_id}-tp"
    area, store = _fresh_area(config, prefix)
    server: ServerProcess | None = None
    try:
        start = time.perf_counter()
        stored = asyncio.run(_bulk(store, profiles.items(0, config.profiles), model.bank))
        insert_s = time.perf_counter() - start
        log(f"stored {stored} profiles under {{{prefix}}} in {insert_s:.1f} s")
        plan = make_plan(config.profiles, config.requests_per_pass, texts, config, config.seed)
        env = {**config.server_env, "XPEFT_ADMIN_TOKEN": token}
        server = ServerProcess(bank_path, config.redis_url, prefix, workdir, env, "throughput").start()
        log(f"server ready in {server.startup_s:.1f} s (pid {server.pid}, {server.url})")
        idle_rss = server.memory()
        offline = Offline(model, profiles, Settings().fused_cache_bytes)
        cold = http_pass(server, plan, config, "http cold")
        off_cold = offline.run(plan, max(1, round(cold["server_batches"]["mean_rows"])), "offline cold")
        warm, off_warm = [], []
        for r in range(config.warm_rounds):
            warm.append(http_pass(server, plan, config, f"http warm {r + 1}"))
            off_warm.append(
                offline.run(
                    plan, max(1, round(warm[-1]["server_batches"]["mean_rows"])), f"offline warm {r + 1}"
                )
            )
        offline.worker.shutdown()
        put_check = check_put_identical(server, store, area, profiles, token)
        log(f"PUT check: {put_check}")
        return {
            "prefix": prefix,
            "stored": stored,
            "insert_s": insert_s,
            "server_startup_s": server.startup_s,
            "server_idle_rss": idle_rss,
            "plan": _plan_summary(plan, config),
            "http_cold": cold,
            "offline_cold": off_cold,
            "http_warm": warm,
            "offline_warm": off_warm,
            "summary": _throughput_summary(cold, off_cold, warm, off_warm),
            "put_check": put_check,
            "server_log_tail": server.log_tail(),
        }
    finally:
        if server is not None:
            server.stop()
        log(f"deleted {area.cleanup()} keys under {{{prefix}}}")


async def _bulk(store: RedisStore, items: Iterator[tuple[str, bytes]], bank: AdapterBank) -> int:
    try:
        return await bulk_put(store, items, bank)
    finally:
        await store.close()


def _plan_summary(plan: list[PlannedRequest], config: Config) -> dict:
    counts: dict[str, int] = {}
    for req in plan:
        counts[req.profile_id] = counts.get(req.profile_id, 0) + 1
    top = sorted(counts.values(), reverse=True)
    sampler = ZipfSampler(config.profiles, config.zipf_s, config.seed)
    return {
        "requests": len(plan),
        "distinct_profiles": len(counts),
        "top1_share": top[0] / len(plan),
        "top100_share": sum(top[:100]) / len(plan),
        "expected_top100_share": sampler.top_share(100),
        "mean_texts_chars": sum(len(t) for r in plan for t in r.texts) / sum(len(r.texts) for r in plan),
    }


def _throughput_summary(cold: dict, off_cold: dict, warm: list[dict], off_warm: list[dict]) -> dict:
    http_warm = median([w["sequences_per_s"] for w in warm])
    offline_warm = median([o["sequences_per_s"] for o in off_warm])
    pooled = [w["latency"] for w in warm]
    return {
        "http_cold_seq_s": cold["sequences_per_s"],
        "offline_cold_seq_s": off_cold["sequences_per_s"],
        "ratio_cold": cold["sequences_per_s"] / off_cold["sequences_per_s"],
        "http_warm_seq_s": http_warm,
        "offline_warm_seq_s": offline_warm,
        "ratio_warm": http_warm / offline_warm,
        "ratio_warm_rounds": [
            w["sequences_per_s"] / o["sequences_per_s"] for w, o in zip(warm, off_warm, strict=True)
        ],
        "http_cold_requests_s": cold["requests_per_s"],
        "http_warm_requests_s": median([w["requests_per_s"] for w in warm]),
        "cold_latency": cold["latency"],
        "warm_latency_median_round": {k: median([p[k] for p in pooled]) for k in pooled[0]},
    }


MEMORY_VARIANTS = {
    "default": {},
    # glibc's default raises its mmap threshold after large frees, so later large tensors come from
    # the heap and fragment it; a fixed threshold keeps them in mmap, returned to the OS on free.
    "mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
}


def memory_phase(
    config: Config,
    model: MultiProfileModel,
    profiles: Profiles,
    texts: list[str],
    bank_path: Path,
    workdir: Path,
    run_id: str,
    token: str,
) -> dict:
    """Two replicas on one store (glibc defaults, and a fixed mmap threshold), same events, same traffic."""
    prefix = f"xpeft-load-{run_id}-mem"
    area, store = _fresh_area(config, prefix)
    servers: dict[str, ServerProcess] = {}
    stages = []
    try:
        used_before = area.used_memory()
        # A small fused cache, full from the first stage on: what RSS shows beyond it is what grows.
        env = {
            **config.server_env,
            "XPEFT_ADMIN_TOKEN": token,
            "XPEFT_FUSED_CACHE_BYTES": str(config.memory_fused_cache_mib * 2**20),
        }
        for name, extra in MEMORY_VARIANTS.items():
            servers[name] = ServerProcess(
                bank_path, config.redis_url, prefix, workdir, {**env, **extra}, f"memory-{name}"
            ).launch()
        for server in servers.values():
            server.wait_ready()
        variants = {
            name: {"env": MEMORY_VARIANTS[name], "rss_before_any_profile": server.memory()}
            for name, server in servers.items()
        }
        stored = 0
        rng = random.Random(config.seed)
        for n in config.memory_stages:
            start = time.perf_counter()
            asyncio.run(_bulk(RedisStore(config.redis_url, prefix), profiles.items(stored, n), model.bank))
            insert_s = time.perf_counter() - start
            stored = n
            time.sleep(2.5)  # let the servers apply the change events and their 1 s version check
            rss_idle = {name: server.memory() for name, server in servers.items()}
            plan = make_plan(n, config.memory_requests, texts, config, config.seed + n)
            per_server = {}
            for name, server in servers.items():
                traffic = http_pass(server, plan, config, f"memory {n} stored, {name}")
                metrics = server.metrics()
                per_server[name] = {
                    "rss_idle": rss_idle[name],
                    "rss_after_traffic": server.memory(),
                    "traffic": {
                        k: traffic[k] for k in ("ok", "sent", "sequences_per_s", "latency", "statuses")
                    },
                    "profile_cache_entries": metrics.get("xpeft_cache_entries{cache=profile}", 0.0),
                    "fused_cache_entries": metrics.get("xpeft_cache_entries{cache=fused}", 0.0),
                    "fused_cache_bytes": metrics.get("xpeft_fused_cache_bytes", 0.0),
                    "invalidations": {
                        k.split("kind=")[1].rstrip("}"): v
                        for k, v in metrics.items()
                        if k.startswith("xpeft_invalidations_total{")
                    },
                }
            ids = [profile_id(i) for i in rng.sample(range(n), min(config.memory_sample_keys, n))]
            redis_mem = area.memory_per_profile(store, ids, n)
            redis_mem["used_memory_delta_per_profile"] = (area.used_memory() - used_before) / n
            stages.append({"stored": n, "insert_s": insert_s, "redis": redis_mem, "servers": per_server})
            log(
                f"memory: {n} stored, server RSS "
                + ", ".join(
                    f"{name} {v['rss_after_traffic']['VmRSS'] / 2**20:.0f} MiB"
                    for name, v in per_server.items()
                )
                + f"; Redis {redis_mem['bytes_per_profile']:.0f} B/profile"
            )
        return {
            "prefix": prefix,
            "variants": variants,
            "stages": stages,
            "fused_cache_capacity": config.memory_fused_cache_mib * 2**20,
            "profile_cache_capacity": Settings().profile_cache_size,
            "redis_server": area.server_info(),
            "server_log_tail": {name: server.log_tail() for name, server in servers.items()},
        }
    finally:
        for server in servers.values():
            server.stop()
        log(f"deleted {area.cleanup()} keys under {{{prefix}}}")
