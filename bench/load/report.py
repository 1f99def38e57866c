"""Renders docs/LOAD_TEST.md and its plots from the load test's result JSON; no number is typed by hand.

    python -m bench.load.report --results bench/load/results/load.json --doc docs/LOAD_TEST.md

The runner calls :func:`write_report` at the end of every run; this command re-renders a stored
result (e.g. after a change of wording) without measuring again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from .stats import median

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
def _setup(result: dict) -> list[str]:
    c, s, hw = result["config"], result["setup"], result["hardware"]
    settings = ", ".join(f"`{k}={v}`" for k, v in s["server_settings"].items())
    env = ", ".join(f"`{k}={v}`" for k, v in s["server_env"].items())
    tp = result.get("throughput", {})
    put = tp.get("put_check", {})
    lines = [
        "## What ran",
        "",
        f"- Command: `{result['command']}` (started {result['started_at']}, took {fmt(result['duration_s'], 0)} s).",
        f"- Hardware: {hw['cpu']}, {hw['usable_cpus']} usable CPUs of {hw['logical_cpus']}, {hw['memory_gib']} GiB; "
        f"{hw['platform']}; Python {hw['python']}, torch {hw['torch']} ({c['torch_threads']} intra-op thread(s) in "
        f"the server and offline; torch's default here is {hw['torch_default_threads']}), "
        f"httpx {hw['httpx']}. Commit `{result['git']['commit'][:12]}`"
        f"{' with uncommitted changes in the measured code' if result['git']['dirty'] else ''}.",
        f"- Model: MiniLM-L6 (`{s['model_id']}`) in fp32 on CPU; random bank `{s['bank_id']}` "
        f"(L={s['L']}, N={s['N']}, d={s['d']}, r={s['r']}), as `xpeft bank create --n {s['N']} --seed "
        f"{c['seed']}` makes it.",
        f"- Profiles: random hard profiles (`random_profile(bank, 'hard', seed=i)`, k={s['k']}), "
        f"{s['xpm_bytes']} bytes of `.xpm` each, ids `p000000`, `p000001`, ...",
        f"- Storing: in bulk through the server's own `RedisStore.put` (the Lua script a PUT runs: version "
        f"counter, hash, index, change event), with the metadata from the PUT handler's own validation "
        f"(`validate_profile`, which decodes the whole file). Check in this run: {put.get('profiles_checked', 0)} "
        f"profiles uploaded again through `PUT /profiles/{{id}}` are stored with "
        f"{'identical' if put.get('identical') else 'DIFFERENT'} `data` and `meta` fields."
        if put
        else "- Storing: in bulk through the server's own `RedisStore.put`.",
        f"- Redis: `{c['redis_url']}` (a database of its own), a fresh key prefix per phase, every key deleted "
        "at the end.",
        f"- Server: `xpeft serve` (uvicorn, one process) on a free loopback port, Redis store; settings "
        f"{settings}; environment {env}. A fresh process for each phase.",
        f"- Traffic: Zipf over profile popularity with s = {c['zipf_s']} (a seeded permutation maps popularity "
        f"ranks to ids); {c['texts_per_request']} text(s) per request drawn from `{s['texts_source']}` "
        f"({s['texts_available']} sentences); httpx async, closed loop, concurrency {c['concurrency']}; "
        f"{c['requests_per_pass']} requests per pass, at most {fmt(c['pass_deadline_s'], 0)} s per pass.",
        "",
    ]
    return lines


def _targets(result: dict) -> list[str]:
    lines = ["## Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    tp = result.get("throughput")
    if tp:
        sm = tp["summary"]
        lines.append(
            f"| server HTTP throughput on CPU ≥ {TARGET_RATIO}× offline (warm) | "
            f"{fmt(sm['ratio_warm'], 2)}× ({fmt(sm['http_warm_seq_s'])} against "
            f"{fmt(sm['offline_warm_seq_s'])} sequences/s; cold {fmt(sm['ratio_cold'], 2)}×) | "
            f"{verdict(sm['ratio_warm'] >= TARGET_RATIO)} |"
        )
    mem = result.get("memory")
    if mem:
        ms = memory_summary(mem)
        lines.append(
            f"| ≤ 4 KB ({TARGET_REDIS_BYTES} B) per profile in Redis | {fmt(ms['redis_max_bytes'], 0)} B "
            f"(largest over the stages) | {verdict(ms['redis_ok'])} |"
        )
        stages = mem["stages"]
        for name in mem["variants"]:
            vs = memory_summary(mem, name)
            lines.append(
                f"| server memory flat from {stages[0]['stored']:,} to {stages[-1]['stored']:,} profiles "
                f"(RSS after traffic grows ≤ {FLAT_TOLERANCE:.0%}), {_variant(mem, name)} | "
                f"{mib(vs['rss_first'])} → {mib(vs['rss_last'])} MiB ({vs['growth_share']:+.1%}) | "
                f"{verdict(vs['flat'])} |"
            )
    return [*lines, ""]


def _pass_row(p: dict) -> str:
    b, cpu, lat = p["server_batches"], p["cpu"], p["latency"]
    errors = sum(v for k, v in p["statuses"].items() if k != "200")
    return (
        f"| {p['label']} | {p['ok']:,} | {fmt(p['requests_per_s'])} | {fmt(p['sequences_per_s'])} | "
        f"{fmt(lat['p50_ms'])} | {fmt(lat['p95_ms'])} | {fmt(lat['p99_ms'])} | {fmt(b['mean_rows'])} | "
        f"{fmt(b['mean_distinct_profiles'])} | {fmt(b['fused_hit_rate'] * 100, 0)} % | "
        f"{fmt(cpu['server_cpu_ms_per_seq'], 2)} | {fmt(cpu['load_gen_cpu_ms_per_seq'], 2)} | "
        f"{fmt(cpu['other_processes_cpu_s'] / p['wall_s'], 2)} | {errors} |"
    )


def _offline_row(p: dict) -> str:
    return (
        f"| {p['label']} | {p['rows']:,} | | {fmt(p['sequences_per_s'])} | | | | {p['batch_rows']} | "
        f"{fmt(p['mean_distinct_profiles'])} | | {fmt(p['cpu']['own_cpu_ms_per_seq'], 2)} | | "
        f"{fmt(p['cpu']['other_processes_cpu_s'] / p['wall_s'], 2)} | |"
    )


def _throughput(result: dict, img: dict[str, str]) -> list[str]:
    tp = result["throughput"]
    sm, plan = tp["summary"], tp["plan"]
    lines = [
        "## Throughput and latency",
        "",
        f"{tp['stored']:,} profiles stored in {fmt(tp['insert_s'])} s; the server was ready "
        f"{fmt(tp['server_startup_s'])} s after it started. The request sequence touches "
        f"{plan['distinct_profiles']:,} distinct profiles; the most popular one gets {plan['top1_share']:.1%} "
        f"of the requests, and the 100 most requested get {plan['top100_share']:.1%} (the 100 most popular of "
        f"the distribution: {plan['expected_top100_share']:.1%}). Cold is the first pass on the fresh server (every profile "
        "read from Redis, decoded and fused on first use); warm is the same sequence again, "
        f"{len(tp['http_warm'])} rounds. Offline runs the same sequence in the same process that generates "
        "the load, through the server's own batch step (`ModelWorker.run`: its fused-weight cache, of the "
        "same capacity, in front of `MultiProfileModel.predict_batch`), in consecutive batches of the mean "
        "size the server formed in the HTTP pass just before, so its batches hold the same mix of distinct "
        "profiles (compare the two 'profiles / batch' columns); HTTP and offline passes alternate.",
        "",
        "| pass | requests | requests/s | sequences/s | p50 ms | p95 ms | p99 ms | rows / batch | "
        "profiles / batch | fused hits | server CPU ms / seq | load-gen CPU ms / seq | other processes (CPUs) | "
        "errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        _pass_row(tp["http_cold"]),
        _offline_row(tp["offline_cold"]),
    ]
    for w, o in zip(tp["http_warm"], tp["offline_warm"], strict=True):
        lines += [_pass_row(w), _offline_row(o)]
    rounds = ", ".join(f"{r:.2f}" for r in sm["ratio_warm_rounds"])
    lat = sm["warm_latency_median_round"]
    lines += [
        "",
        "Offline rows: 'server CPU' is the CPU of the offline process itself. 'Other processes' is the "
        "machine's busy CPU not used by the server or this process during the pass, in CPUs: other users "
        "of the machine.",
        "",
        f"- Warm: {fmt(sm['http_warm_requests_s'])} requests/s, {fmt(sm['http_warm_seq_s'])} sequences/s over "
        f"HTTP against {fmt(sm['offline_warm_seq_s'])} offline (medians of the rounds): "
        f"**{fmt(sm['ratio_warm'], 2)}×** (per round: {rounds}). Latency (median of the rounds): "
        f"p50 {fmt(lat['p50_ms'])} ms, p95 {fmt(lat['p95_ms'])} ms, p99 {fmt(lat['p99_ms'])} ms.",
        f"- Cold: {fmt(sm['http_cold_requests_s'])} requests/s, {fmt(sm['http_cold_seq_s'])} sequences/s "
        f"against {fmt(sm['offline_cold_seq_s'])} offline: **{fmt(sm['ratio_cold'], 2)}×**; p50 "
        f"{fmt(sm['cold_latency']['p50_ms'])} ms, p95 {fmt(sm['cold_latency']['p95_ms'])} ms, p99 "
        f"{fmt(sm['cold_latency']['p99_ms'])} ms.",
        "",
    ]
    if "throughput" in img:
        lines += [f"![throughput and latency]({img['throughput']})", ""]
    return lines


def _variant(mem: dict, name: str) -> str:
    env = mem["variants"][name]["env"]
    return "glibc malloc as is" if not env else "with " + ", ".join(f"`{k}={v}`" for k, v in env.items())


def _memory(result: dict, img: dict[str, str]) -> list[str]:
    mem = result["memory"]
    first = mem["stages"][0]
    lines = [
        "## Memory against profiles stored",
        "",
        "Two fresh servers (replicas) watched the same store while profiles were added, each applying every "
        "change event: one " + _variant(mem, "default") + ", one " + _variant(mem, "mmap_threshold") + ". "
        f"Both ran with the fused-weight cache set to {mib(mem['fused_cache_capacity'])} MiB "
        "(`XPEFT_FUSED_CACHE_BYTES`), so that it is full and evicting from the first stage on: what RSS "
        "shows beyond it is what grows. After each step both got the same "
        f"{result['config']['memory_requests']:,} Zipf requests over everything stored. 'Idle' RSS is read "
        "after storing, before that traffic, and 'Δ while storing' is idle RSS minus the RSS after the "
        "previous step's traffic: what storing profiles alone cost. RSS is `VmRSS` from `/proc`. Before any "
        "profile they held "
        + " and ".join(f"{mib(v['rss_before_any_profile']['VmRSS'])} MiB" for v in mem["variants"].values())
        + ". Redis bytes per profile are `MEMORY USAGE <key> SAMPLES 0` of "
        f"{first['redis']['sampled_keys']:,} sampled profile hashes, plus each profile's share of the id index "
        "(a sorted set); `used_memory Δ` is the whole instance's growth divided by the profiles stored (other "
        "users of the same Redis move it).",
        "",
        "| profiles stored | Redis B / profile | hash | index share | `.xpm` bytes | meta JSON bytes | "
        "used_memory Δ / profile |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for st in mem["stages"]:
        r = st["redis"]
        lines.append(
            f"| {st['stored']:,} | {fmt(r['bytes_per_profile'], 0)} | {fmt(r['hash_bytes_mean'], 0)} | "
            f"{fmt(r['index_bytes_per_profile'], 1)} | {fmt(r['xpm_bytes_mean'], 0)} | "
            f"{fmt(r['meta_bytes_mean'], 0)} | {fmt(r['used_memory_delta_per_profile'], 0)} |"
        )
    lines += [
        "",
        "| profiles stored | server | RSS idle MiB | Δ while storing MiB | RSS after traffic MiB | peak RSS MiB | "
        "profile cache entries | fused cache MiB (entries) | change events applied | cache resets | sequences/s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    deltas = {name: storing_deltas(mem, name) for name in mem["variants"]}
    for i, st in enumerate(mem["stages"]):
        for name, v in st["servers"].items():
            inv = v["invalidations"]
            lines.append(
                f"| {st['stored']:,} | {name} | {mib(v['rss_idle']['VmRSS'])} | {mib(deltas[name][i])} | "
                f"{mib(v['rss_after_traffic']['VmRSS'])} | "
                f"{mib(v['rss_after_traffic']['VmHWM'])} | {v['profile_cache_entries']:,.0f} | "
                f"{mib(v['fused_cache_bytes'])} ({v['fused_cache_entries']:,.0f}) | {inv.get('put', 0):,.0f} | "
                f"{inv.get('reset', 0):,.0f} | {fmt(v['traffic']['sequences_per_s'])} |"
            )
    lines += [""]
    for name in mem["variants"]:
        ms = memory_summary(mem, name)
        lines.append(
            f"- {name}: RSS after traffic {mib(ms['rss_first'])} → {mib(ms['rss_last'])} MiB "
            f"({ms['growth_share']:+.1%}, {fmt(ms['growth_per_stored_profile'], 0)} bytes per profile added); "
            f"storing alone {mib(ms['storing_growth'])} MiB in all ({fmt(ms['storing_growth_per_profile'], 1)} bytes "
            "per profile stored)."
        )
    lines += [
        "",
        f"The caches are bounded: fused weights by bytes ({mib(mem['fused_cache_capacity'])} MiB here), decoded "
        f"profiles by count ({mem['profile_cache_capacity']:,} entries, not bytes). Redis hashes are "
        f"`{first['redis']['encoding']}`-encoded (Redis {mem['redis_server']['redis_version']}).",
        "",
    ]
    if "memory" in img:
        lines += [f"![memory against profiles stored]({img['memory']})", ""]
    for name, tail in mem.get("server_log_tail", {}).items():
        tail = [line for line in tail if line.strip()]
        if tail:
            lines += [
                f"Server log of the `{name}` replica (warning level), last lines:",
                "",
                "```",
                *tail,
                "```",
                "",
            ]
    return lines


def render_markdown(result: dict, img: dict[str, str], analysis: list[str] | None = None) -> str:
    """The whole report. ``img`` maps 'throughput' / 'memory' to image paths relative to the doc."""
    title = "# Server load test" + (" (quick smoke run: not a measurement)" if result.get("quick") else "")
    lines = [
        title,
        "",
        "Generated by `python -m bench.load.run` from `" + result.get("results_path", "") + "`; "
        "do not edit by hand (re-render: `python -m bench.load.report`). "
        "The offline benchmark of the encoder itself is in [BENCHMARKS.md](BENCHMARKS.md).",
        "",
    ]
    lines += _targets(result)
    lines += _setup(result)
    if "throughput" in result:
        lines += _throughput(result, img)
    if "memory" in result:
        lines += _memory(result, img)
    lines += analysis if analysis is not None else _analysis(result)
    return "\n".join(lines).rstrip() + "\n"


def _throughput_analysis(result: dict) -> list[str]:
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


def _memory_analysis(result: dict) -> list[str]:
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


def _analysis(result: dict) -> list[str]:
    """Reading of the numbers, every figure taken from the result."""
    lines = ["## Analysis", ""]
    if "throughput" in result:
        lines += _throughput_analysis(result)
    if "memory" in result:
        lines += _memory_analysis(result)
    return [*lines, ""]


# -- plots ------------------------------------------------------------------------------------
def plot_throughput(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = result["throughput"]
    sm = tp["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = ["cold", "warm"]
    x = range(len(labels))
    http = [sm["http_cold_seq_s"], sm["http_warm_seq_s"]]
    offline = [sm["offline_cold_seq_s"], sm["offline_warm_seq_s"]]
    ax1.bar([i - 0.2 for i in x], offline, 0.4, label="offline (predict_batch)", color="#888888")
    ax1.bar([i + 0.2 for i in x], http, 0.4, label="HTTP server", color="#1f77b4")
    for i, (h, o) in enumerate(zip(http, offline, strict=True)):
        ax1.annotate(f"{h / o:.2f}×", (i + 0.2, h), ha="center", va="bottom")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("sequences / s")
    ax1.set_title("throughput (warm: median of rounds)")
    ax1.set_ylim(0, 1.3 * max(http + offline))
    ax1.legend(loc="upper left", fontsize=8)
    passes = [tp["http_cold"], *tp["http_warm"]]
    qs = ["p50_ms", "p95_ms", "p99_ms"]
    width = 0.8 / len(passes)
    for j, p in enumerate(passes):
        ax2.bar(
            [i + (j - (len(passes) - 1) / 2) * width for i in range(len(qs))],
            [p["latency"][q] for q in qs],
            width,
            label=p["label"],
        )
    ax2.set_xticks(range(len(qs)), ["p50", "p95", "p99"])
    ax2.set_ylabel("latency, ms (client side)")
    ax2.set_title(f"latency at concurrency {result['config']['concurrency']}")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = result["memory"]
    stages = mem["stages"]
    n = [s["stored"] for s in stages]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, variant), color in zip(mem["variants"].items(), ("#1f77b4", "#2ca02c"), strict=False):
        ax1.plot(
            n,
            [s["servers"][name]["rss_after_traffic"]["VmRSS"] / MIB for s in stages],
            "o-",
            color=color,
            label=f"{name}: after traffic",
        )
        ax1.plot(
            n,
            [s["servers"][name]["rss_idle"]["VmRSS"] / MIB for s in stages],
            "s--",
            color=color,
            label=f"{name}: idle, after storing",
        )
        ax1.axhline(variant["rss_before_any_profile"]["VmRSS"] / MIB, color=color, lw=0.6, ls=":")
    ax1.axhline(mem["fused_cache_capacity"] / MIB, color="#888888", lw=0.8, label="fused cache bound")
    ax1.set_xscale("log")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("profiles stored")
    ax1.set_ylabel("server RSS, MiB (dotted: before any profile)")
    ax1.set_title("server memory")
    ax1.legend(fontsize=7, loc="lower right")
    ax2.plot(n, [s["redis"]["bytes_per_profile"] for s in stages], "o-", label="MEMORY USAGE (hash + index)")
    ax2.plot(n, [s["redis"]["xpm_bytes_mean"] for s in stages], "s--", label=".xpm bytes")
    ax2.axhline(TARGET_REDIS_BYTES, color="#d62728", lw=0.8, label="target 4 KB")
    ax2.set_xscale("log")
    ax2.set_ylim(0, TARGET_REDIS_BYTES * 1.2)
    ax2.set_xlabel("profiles stored")
    ax2.set_ylabel("bytes per profile")
    ax2.set_title("Redis")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, doc: Path, results_path: Path | None = None, plots: bool = True) -> str:
    """Write the doc and its PNGs (``<doc dir>/img/load_*.png``); returns the markdown."""
    doc = Path(doc)
    if results_path is not None:
        result = {**result, "results_path": _display_path(results_path)}
    img: dict[str, str] = {}
    if plots:
        img_dir = doc.parent / "img"
        img_dir.mkdir(parents=True, exist_ok=True)
        for name, plot in (("throughput", plot_throughput), ("memory", plot_memory)):
            if name in result:
                path = img_dir / f"load_{name}.png"
                plot(result, path)
                img[name] = os.path.relpath(path, doc.parent)
    text = render_markdown(result, img)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def _display_path(path: Path) -> str:
    repo = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(repo))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.load.report", description="render docs/LOAD_TEST.md")
    p.add_argument("--results", type=Path, default=Path("bench/load/results/load.json"))
    p.add_argument("--doc", type=Path, default=Path("docs/LOAD_TEST.md"))
    args = p.parse_args(argv)
    write_report(json.loads(args.results.read_text()), args.doc, args.results)


if __name__ == "__main__":
    main()
