"""The load test's figures read against its targets: the shared formatting, the memory summary
and the "Analysis" section of docs/LOAD_TEST.md, every figure taken from the result JSON."""

from __future__ import annotations

import math

from bench.common.stats import median

TARGET_RATIO = 0.75
TARGET_REDIS_BYTES = 4096
FLAT_TOLERANCE = 0.10  # RSS may grow at most 10 % from the smallest to the largest stage
MIB = 2**20


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def mib(n: float) -> str:
    return fmt(n / MIB, 1)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


# -- derived numbers ----------------------------------------------------------------------------
def storing_deltas(mem: dict, variant: str) -> list[int]:
    """Per stage, RSS change while profiles were being stored (no traffic in between): idle minus the
    RSS after the previous stage's traffic (before the first stage: the RSS before any profile)."""
    before = mem["variants"][variant]["rss_before_any_profile"]["VmRSS"]
    out = []
    for st in mem["stages"]:
        server = st["servers"][variant]
        out.append(server["rss_idle"]["VmRSS"] - before)
        before = server["rss_after_traffic"]["VmRSS"]
    return out


def memory_summary(mem: dict, variant: str = "default") -> dict:
    """One server variant's RSS growth across the stages, and the largest Redis cost per profile."""
    stages = mem["stages"]
    first, last = stages[0]["servers"][variant], stages[-1]["servers"][variant]
    rss_first, rss_last = first["rss_after_traffic"]["VmRSS"], last["rss_after_traffic"]["VmRSS"]
    growth = rss_last - rss_first
    added = stages[-1]["stored"] - stages[0]["stored"]
    storing = storing_deltas(mem, variant)
    redis_max = max(s["redis"]["bytes_per_profile"] for s in stages)
    return {
        "rss_first": rss_first,
        "rss_last": rss_last,
        "growth": growth,
        "growth_share": growth / rss_first,
        "growth_per_stored_profile": growth / added if added else 0.0,
        "storing_growth": sum(storing),
        "storing_growth_per_profile": sum(storing) / stages[-1]["stored"],
        "flat": growth / rss_first <= FLAT_TOLERANCE,
        "redis_max_bytes": redis_max,
        "redis_ok": redis_max <= TARGET_REDIS_BYTES,
    }


# -- markdown -----------------------------------------------------------------------------------
def throughput_analysis(result: dict) -> list[str]:
    tp = result["throughput"]
    sm, warm, off = tp["summary"], tp["http_warm"], tp["offline_warm"]
    c = result["config"]
    busy = median([w["server_batches"]["worker_busy"] for w in warm])
    batch_ms = median([w["server_batches"]["mean_batch_ms"] for w in warm])
    off_batch_ms = median([o["mean_batch_ms"] for o in off])
    rows = median([w["server_batches"]["mean_rows"] for w in warm])
    wait_ms = median([w["server_batches"]["mean_queue_wait_ms"] for w in warm])
    server_ms = median([w["cpu"]["server_cpu_ms_per_seq"] for w in warm])
    gen_ms = median([w["cpu"]["load_gen_cpu_ms_per_seq"] for w in warm])
    off_ms = median([o["cpu"]["own_cpu_ms_per_seq"] for o in off])
    other = median([w["cpu"]["other_processes_cpu_s"] / w["wall_s"] for w in warm])
    cores = result["hardware"]["usable_cpus"]
    met = sm["ratio_warm"] >= TARGET_RATIO
    cold = tp["http_cold"]["server_batches"]
    return [
        f"- Throughput: warm HTTP reaches {fmt(sm['ratio_warm'], 2)}× offline, "
        + ("meeting" if met else "missing")
        + f" the {TARGET_RATIO}× target; cold {fmt(sm['ratio_cold'], 2)}×. "
        f"Both sides run the same batches on {c['torch_threads']} intra-op thread(s), so the gap is what serving "
        "adds: the model worker was busy "
        f"{busy:.0%} of the warm passes' wall time, and a batch of {fmt(rows)} rows took {fmt(batch_ms)} ms in the "
        f"server against {fmt(off_batch_ms)} ms offline. "
        + (
            "Idle gaps between batches cost little; the batches themselves are slower, because the HTTP work and "
            "the load generator compete with the model for the same CPUs."
            if busy >= 0.9
            else "The worker also sits idle between batches: closing a batch, answering it and receiving the next "
            "requests happen on the event loop while the model waits."
        ),
        f"- CPU per sequence (warm medians): the server used {fmt(server_ms, 2)} ms, the offline model "
        f"{fmt(off_ms, 2)} ms, so HTTP, JSON, validation, the event loop and the batcher cost about "
        f"{fmt(server_ms - off_ms, 2)} ms per request of {c['texts_per_request']} text(s); the load generator, on the "
        f"same {cores} CPUs, used {fmt(gen_ms, 2)} ms per request, and other users of the machine about "
        f"{fmt(other, 2)} CPUs during the passes. Serving over HTTP thus needs "
        f"{fmt(server_ms + gen_ms, 2)} ms of CPU per sequence on these CPUs where offline needs {fmt(off_ms, 2)}: "
        "on CPUs shared with the load generator and other users, throughput follows that CPU. An estimate, "
        "not a measurement: with the load generator on other cores, the server's CPU efficiency (offline CPU "
        f"per sequence over server CPU per sequence) would allow about {fmt(off_ms / server_ms, 2)}× offline. "
        "With several texts per request (`--texts-per-request`) the per-request costs are shared by more "
        "sequences.",
        f"- Batching: with {c['concurrency']} closed-loop clients and one text per request the batches held "
        f"{fmt(rows)} rows: while one batch runs, the clients it answered are still sending, so about half the "
        f"clients wait for the next batch. Latency is that queue wait ({fmt(wait_ms)} ms on average) plus the "
        "request's own batch.",
        f"- Cold against warm: the cold pass fused {cold['profiles_fused']:,.0f} profiles (fused-cache hit rate "
        f"{cold['fused_hit_rate']:.0%}), read and decoded each profile on first use; offline cold pays the same "
        "decode and fusion, so the cold ratio compares like with like.",
    ]


def memory_analysis(result: dict) -> list[str]:
    mem = result["memory"]
    ms, fixed = memory_summary(mem), memory_summary(mem, "mmap_threshold")
    last = mem["stages"][-1]
    r = last["redis"]
    resets = {name: v["invalidations"].get("reset", 0) for name, v in last["servers"].items()}
    lines = [
        f"- Redis: {fmt(r['bytes_per_profile'], 0)} bytes per profile at {last['stored']:,} stored: the "
        f"{fmt(r['xpm_bytes_mean'], 0)}-byte `.xpm`, its {fmt(r['meta_bytes_mean'], 0)}-byte metadata JSON (which "
        "repeats the `.xpm` header), three small fields, and the hash's own overhead: the `data` field is longer "
        f"than `hash-max-listpack-value` ({mem['redis_server']['hash_max_listpack_value']}), so each profile is a "
        f"`{r['encoding']}` hash, plus {fmt(r['index_bytes_per_profile'], 0)} bytes in the id index. "
        + ("Within the 4 KB target." if ms["redis_ok"] else "Over the 4 KB target."),
        f"- Server memory, glibc as is: RSS after traffic went {mib(ms['rss_first'])} → {mib(ms['rss_last'])} MiB "
        f"({ms['growth_share']:+.1%}); with the fixed mmap threshold {mib(fixed['rss_first'])} → "
        f"{mib(fixed['rss_last'])} MiB ({fixed['growth_share']:+.1%}), with the same events and requests, both "
        f"fused caches full ({mib(mem['fused_cache_capacity'])} MiB) and "
        + " and ".join(f"{v['profile_cache_entries']:,.0f}" for v in last["servers"].values())
        + f" decoded profiles cached at the end. Storing {last['stored']:,} profiles alone moved the first "
        f"replica's RSS by {mib(ms['storing_growth'])} MiB ({fmt(ms['storing_growth_per_profile'], 1)} bytes per "
        "profile stored). "
        + (
            "What grows is traffic, not profiles stored, and the two replicas differ only in the allocator "
            "setting, so the extra growth is the allocator's: large, variably sized per-batch tensors and "
            "evicted fused weights come from glibc's heap once its dynamic mmap threshold has risen, and the "
            "fragmented heap is not given back (peak RSS equals RSS). "
            if fixed["growth"] < ms["growth"]
            else "The fixed mmap threshold did not reduce the growth in this run. "
        )
        + "The fixed threshold has a price: the same requests ran at "
        + " against ".join(
            f"{fmt(median([st['servers'][name]['traffic']['sequences_per_s'] for st in mem['stages']]))}"
            for name in last["servers"]
        )
        + " sequences/s (median over the stages, "
        + " against ".join(last["servers"])
        + "), since every large "
        "tensor is then a fresh mmap with its page faults; the replicas took their traffic one after the "
        "other, so machine noise falls on them differently.",
    ]
    if any(resets.values()):
        lines.append(
            "- Cache resets: the replicas emptied their caches "
            + " and ".join(f"{v:,.0f}" for v in resets.values())
            + " times while profiles were being stored, logging 'the store was reset', though nothing was "
            "reset: see the server logs above. Emptying the caches gives memory back (so 'Δ while storing' "
            "can be negative) and also forgets the version floors, so the storing figures leave out the "
            "per-id floor that a replica otherwise keeps for every id written."
        )
    return lines


def analysis_section(result: dict) -> list[str]:
    """Reading of the numbers, every figure taken from the result."""
    lines = ["## Analysis", ""]
    if "throughput" in result:
        lines += throughput_analysis(result)
    if "memory" in result:
        lines += memory_analysis(result)
    return [*lines, ""]
