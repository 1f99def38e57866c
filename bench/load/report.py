"""Renders docs/LOAD_TEST.md and its plots from the load test's result JSON; no number is typed by hand.

    python -m bench.load.report --results bench/load/results/load.json --doc docs/LOAD_TEST.md

The runner calls :func:`write_report` at the end of every run; this command re-renders a stored
result (e.g. after a change of wording) without measuring again.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.load.analysis import (
    FLAT_TOLERANCE,
    TARGET_RATIO,
    TARGET_REDIS_BYTES,
    analysis_section,
    fmt,
    memory_summary,
    mib,
    storing_deltas,
    verdict,
)
from bench.load.plots import plot_memory, plot_throughput


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
        "profiles (compare the two 'profiles / batch' columns), on the same encoder backend as the "
        f"servers (`{result.get('backend', 'torch')}`); HTTP and offline passes alternate.",
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


GPU_CHECKS = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_check.json"


def gpu_section(checks: dict | None) -> list[str]:
    """The HTTP load on a GPU: ``bench/gpu_check.py``'s HTTP step, when its JSON holds a GPU run of it."""
    from bench.serving_report import http_block

    out = ["## On a GPU", ""]
    if not checks or checks.get("meta", {}).get("device") != "cuda" or not checks.get("http"):
        return out + [
            "No GPU run of the HTTP load yet: `bench/gpu_run.sh` (after `bench/gpu_prepare.sh`) measures "
            "it with `bench/gpu_check.py`, and `python -m bench.load.report` renders it here.",
            "",
        ]
    return out + [
        f"From `bench/gpu_check.py` (`{checks['meta']['command']}`, {checks['meta']['date']}, commit "
        f"`{checks['meta']['git']}`): one `xpeft serve` on loopback with the SQLite store and a random bank "
        "of N = 100, hard profiles with a `cosine` abstention rule, against the same requests offline. "
        "Not the Redis and Zipf setup above.",
        "",
        *http_block(checks, "cuda")[2:],
    ]


def render_markdown(
    result: dict, img: dict[str, str], analysis: list[str] | None = None, gpu_checks: dict | None = None
) -> str:
    """The whole report. ``img`` maps 'throughput' / 'memory' to image paths relative to the doc;
    ``gpu_checks``: a ``bench/gpu_check.py`` result, for its GPU HTTP run."""
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
    lines += analysis if analysis is not None else analysis_section(result)
    lines += gpu_section(gpu_checks)
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    result: dict,
    doc: Path,
    results_path: Path | None = None,
    plots: bool = True,
    gpu_checks: Path | None = GPU_CHECKS,
) -> str:
    """Write the doc and its PNGs (``<doc dir>/img/load_*.png``); returns the markdown. The GPU
    section reads ``gpu_checks`` (the committed gpu_check result by default)."""
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
    gpu = json.loads(gpu_checks.read_text()) if gpu_checks is not None and gpu_checks.exists() else None
    text = render_markdown(result, img, gpu_checks=gpu)
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
    p.add_argument("--gpu-checks", type=Path, default=GPU_CHECKS, help="bench/gpu_check.py's JSON from a GPU")
    args = p.parse_args(argv)
    write_report(json.loads(args.results.read_text()), args.doc, args.results, gpu_checks=args.gpu_checks)


if __name__ == "__main__":
    main()
