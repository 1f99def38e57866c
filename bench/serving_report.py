"""The serving-path sections of docs/BENCHMARKS.md (rendered by bench/report.py).

From a gpu_check run (its checks, its ``runtime`` and ``http`` parts: GPU, and the same script on
a CPU with ``--cpu``), bench/load/single.py's wrk runs and bench/abstain_speed.py's timing. Each
table names the hardware and the command its numbers came from.
"""

from __future__ import annotations

#: the targets, as ratios to the base encoder (runtime) or to offline (HTTP)
TARGETS = {
    "cuda": {
        "cold": 0.90,
        "warm": 0.93,
        "cold_units": 0.90,
        "warm_units": 0.95,
        "naive_speedup": 30.0,
        "http": 0.7,
    },
    # http_wrk: single-text predicts against the fastest plain encoder; http_infinity: against Infinity
    "cpu": {
        "cold": 0.85,
        "cold_units": 0.90,
        "warm_units": 0.95,
        "http_wrk": 0.6,  # one text per request
        "http_wrk_batched": 0.85,  # several texts per request
        "http_infinity": 1.3,
    },
}


def _met(value: float, target: float | None) -> str:
    return "" if target is None else ("yes" if value >= target else "no")


def checks_block(checks: dict) -> list[str]:
    out = [
        "### GPU correctness (`bench/gpu_check.py`)",
        "",
        f"Run: {checks['meta']['hardware']}, {checks['meta']['date']}, status **{checks['status']}**. "
        "Errors are relative (‖out − ref‖ / ‖ref‖) against float64 on the CPU; for the adapter "
        "application, of the adapter's contribution `out − h`, which is stricter than of `out`. "
        "`runtime`: the server's batch step against the fp32 CPU model, a profile of every kind under "
        "no rule and under each abstention score, label probabilities (relative error) and each "
        "score's largest confidence difference. `user_serve`: `xpeft serve` with profiles trained "
        "with the defaults, answers over HTTP against the CPU reference.",
        "",
        "| check | case | dtype | path | rel. error | confidence (largest difference) | passed |",
        "| --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for c in checks["checks"]:
        err = c.get("rel_err_delta", c.get("rel_err"))
        case = c.get("case", c.get("model", ""))
        if c["check"] == "runtime" and "profiles" in c:
            case = f"{c['profiles']} profiles"
        elif c["check"] == "user_serve":
            case = f"rules: {', '.join(c.get('rules', []))}; device {c.get('device')}"
        conf = ", ".join(f"{k} {v:.1e}" for k, v in c.get("confidence_err", {}).items())
        out.append(
            f"| {c['check']} | {case} | {c.get('dtype', '')} | {c.get('path', '')} | "
            f"{'' if err is None else f'{err:.2e}'} | {conf} | {c.get('passed')} |"
        )
    tiles = [t for t in checks.get("apply_tiles", []) if "ms" in t]
    if tiles:
        out += [
            "",
            "SGMV tile sweep, 64 rows x 128 tokens, 64 distinct profiles, ms per layer:",
            "",
            "| impl | tokens per program | warps | ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        out += [
            f"| {t['impl']} | {t.get('block_t', '')} | {t.get('num_warps', '')} | {t['ms']:.4f} |"
            for t in tiles
        ]
    over = checks.get("launch_overhead", [])
    if over:
        out += ["", "Host cost (Python and launches):", ""]
        for o in over:
            if "us" in o:
                out.append(f"- {o['what']}, {o['impl']}: {o['us']:.0f} µs")
            else:
                out.append(
                    f"- {o['what']}, {o['impl']}: enqueued in {o['enqueue_ms']:.2f} ms, "
                    f"finished in {o['wall_ms']:.2f} ms"
                )
    return out + [""]


def runtime_block(check: dict, device: str) -> list[str]:
    rows = [r for r in check.get("runtime", []) if "ratio_to_base" in r]
    if not rows:
        return []
    meta = check["meta"]
    targets = TARGETS[device]
    naive = {r["distinct"]: r for r in rows if r["variant"] == "naive"}
    out = [
        f"### Serving path, the runtime's own batch step ({'GPU' if device == 'cuda' else 'CPU'})",
        "",
        f"Run: {meta['hardware']}, {meta['date']}; command `{meta['command']}`. Texts in, predictions "
        "out through `ModelWorker.run` (the server's batch step: slot pool, `predict_batch`, heads, "
        "CUDA graphs where on); `cold` empties the pool before every batch, so every profile is fused "
        "into its slot; `cold_units` and `warm_units` are the same with profiles of the shipped default "
        "kind, units (fused by a gather of their selected units); `base` is the plain encoder on the same texts, tokenized the same way "
        "(as a CUDA graph where graphs are on). Medians of rotating rounds.",
        "",
        "| U | N | variant | batch | tokens | ms | seq/s | ratio to base | vs naive | target met |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        variant = r["variant"]
        target = targets.get(variant) if r["distinct"] == 64 else None
        vs = ""
        if r["distinct"] in naive and variant in ("cold", "warm"):
            speedup = naive[r["distinct"]]["ms"] / r["ms"]
            vs = f"{speedup:.1f}x"
            if device == "cuda" and target is not None:
                target_met = r["ratio_to_base"] >= target and speedup >= targets["naive_speedup"]
                met = "yes" if target_met else "no"
            else:
                met = _met(r["ratio_to_base"], target)
        else:
            met = _met(r["ratio_to_base"], target)
        out.append(
            f"| {r['distinct']} | {r['N'] or ''} | {variant} | {r['batch']} | {r['seq_len']} | {r['ms']:.2f} | "
            f"{r['seq_per_s']:.0f} | {r['ratio_to_base']:.3f} | {vs} | {met} |"
        )
    return [*out, ""]


def http_block(check: dict, device: str) -> list[str]:
    http = check.get("http")
    if not http or not http.get("passes"):
        return []
    target = TARGETS[device].get("http")
    out = [
        f"### Serving path under HTTP ({'GPU' if device == 'cuda' else 'CPU'})",
        "",
        f"Run: {check['meta']['hardware']}. `xpeft serve` on loopback, {http['profiles']} warm profiles, "
        f"{http['texts_per_request']} texts per request, {http['clients']} clients of {http['generator']}; "
        "offline: the same requests through `ModelWorker.run` in this process, in batches of the size "
        "the server formed, alternating with the HTTP passes.",
        "",
        "| pass | HTTP seq/s | offline seq/s | ratio | p50 ms | p99 ms | rows per batch | worker busy | target met | where the time goes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for p in http["passes"]:
        b = p["server_batches"]
        out.append(
            f"| {p['pass']} | {p['http_seq_per_s']:.0f} | {p['offline']['seq_per_s']:.0f} | {p['ratio']:.3f} | "
            f"{p['latency'].get('p50_ms', 0):.1f} | {p['latency'].get('p99_ms', 0):.1f} | "
            f"{b.get('mean_rows', 0):.1f} | {b.get('worker_busy', 0):.0%} | {_met(p['ratio'], target)} | "
            f"{p['bottleneck']} |"
        )
    return [*out, ""]


def single_block(single: dict | None, budgets: dict | None = None) -> list[str]:
    if not single or not single.get("runs"):
        return []
    c, hw = single["config"], single["hardware"]
    per_request = c.get("texts_per_request", 1)
    target = TARGETS["cpu"]["http_wrk" if per_request == 1 else "http_wrk_batched"]
    command = single.get("command", "python -m bench.load.single")
    infinity = " and Infinity" if c.get("infinity") else ""
    out = [
        f"### Predicts of {per_request} text{'s' if per_request > 1 else ''} under wrk against the plain "
        f"encoder{infinity} (CPU)",
        "",
        f"Run: {hw['cpu']}, {hw['usable_cpus']} usable cores, threads {c['threads'] or hw['usable_cpus']}, "
        f"server backend `{c.get('backend', 'torch')}`; command `{command}`. `xpeft serve` holds "
        f"{c['profiles']} warm {c.get('kind', 'hard')} profiles; wrk (one thread) sends predicts of "
        f"{c.get('texts_per_request', 1)} text(s) round-robin over them for {c['seconds']:.0f} s per round, "
        f"{c['rounds']} rounds. After each wrk round every baseline runs the same texts for as long: the plain "
        f"encoder (tokenizer, forward, mean pooling; no adapters, no heads, no HTTP) in batches of "
        f"{c['plain_batch']} on torch eager fp32 and on ONNX Runtime int8, and Infinity (embeddings only, "
        "ONNX Runtime engine) under the same wrk load when it was given. Figures are min / median / max "
        "over the rounds; ratios pair medians of the same rounds, `ratio` against the fastest plain "
        "encoder; `loop ms per request` is the CPU time of the server's main thread (the event loop: HTTP, "
        "routing, the predict handler, batching) per request, median of the rounds; `other load` is the "
        "largest busy share of the machine outside the server in any round, "
        f"in cores. Targets: `ratio` at least {target} against the fastest plain encoder"
        + (f", and at least {TARGETS['cpu']['http_infinity']}x Infinity's throughput." if infinity else "."),
        "",
        *_single_table(single, target),
    ]
    if infinity:
        out += [
            "Infinity ran from a virtualenv of its own (`pip install 'infinity-emb[server,optimum]==0.0.78' "
            "onnxruntime` with the CPU build of torch) on the MiniLM encoder exported by "
            "`optimum-cli export onnx --model <the MiniLM folder> --task feature-extraction <folder>`, "
            "served as `infinity_emb v2 --model-id . --engine optimum --device cpu` from that folder "
            "(bench/load/baselines.py); it logs that its graph optimisation fails with the optimum it "
            "installs and serves the exported fp32 graph.",
            "",
        ]
    if budgets and budgets.get("runs"):
        b = budgets["config"]
        out += [
            f"Token budget (`XPEFT_MAX_BATCH_TOKENS`), one server each: command `{budgets.get('command')}`, "
            f"{b['rounds']} round(s) of {b['seconds']:.0f} s per client count, the same texts and baselines. "
            + _best_budgets(budgets)
            + " Rounds vary with what else the machine runs (the baselines' own columns show by how much), "
            "so read the ratios, which pair each server round with baseline rounds next to it.",
            "",
            *_single_table(budgets, None),
        ]
    profile = single.get("profile")
    if profile:
        out += [
            f"Where the server's CPU goes under {c['clients'][0]} clients: py-spy, {profile['samples']:,} "
            f"samples of threads on CPU; flame graph [img/{profile['svg']}](img/{profile['svg']}). Leaf "
            "frames with the largest shares (thread | frame):",
            "",
            "| share | thread and leaf frame |",
            "| ---: | --- |",
            *[f"| {t['share']:.1%} | `{t['frame']}` |" for t in profile["top"][:12]],
            "",
        ]
        if profile.get("threads"):
            out += [
                "Samples by thread: "
                + ", ".join(f"`{name}` {share:.1%}" for name, share in profile["threads"].items())
                + ". ONNX Runtime's own worker threads are not Python threads and do not appear; a "
                "thread waiting on its queue (`_worker`, `thread.py:81`) is idle, though py-spy counts it.",
                "",
            ]
    return out


def _best_budgets(budgets: dict) -> str:
    """Which budget gave the best ratio at each client count, from the sweep's own runs."""
    best: dict[int, dict] = {}
    for r in budgets["runs"]:
        if r["clients"] not in best or r["ratio"] > best[r["clients"]]["ratio"]:
            best[r["clients"]] = r
    return (
        "Best ratio: "
        + "; ".join(
            f"{r['budget']} tokens at {clients} clients ({r['ratio']:.3f}, batches of {r.get('mean_rows', 0):.1f} rows)"
            for clients, r in sorted(best.items())
        )
        + "."
    )


def _loop_ms(run: dict) -> str:
    """The event loop's CPU milliseconds per request (median of the rounds); runs before it was
    measured have none."""
    value = run.get("loop_ms_per_request")
    return "" if value is None else f"{value:.2f}"


def _mmm(spread: dict | None) -> str:
    return "" if not spread else f"{spread['min']:.0f} / {spread['median']:.0f} / {spread['max']:.0f}"


def _single_table(single: dict, target: float | None) -> list[str]:
    runs = single["runs"]
    names = list(runs[0].get("baselines", {})) if runs else []
    out = [
        "| clients | tokens per batch | xpeft seq/s | "
        + "".join(f"{n} seq/s | " for n in names)
        + "ratio | vs fastest | "
        + "".join(f"vs {n} | " for n in names)
        + "target met | p50 ms | p99 ms | p99/p50 | non-2xx | rows per batch | worker busy | "
        + "loop ms per request | other load |",
        "| ---: | ---: | ---: | "
        + "---: | " * len(names)
        + "---: | --- | "
        + "---: | " * len(names)
        + "--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        p50, p99 = r.get("p50_ms", 0.0), r.get("p99_ms", 0.0)
        served = _mmm(r.get("wrk")) or f"{r['wrk_seq_per_s']:.0f}"
        base = "".join(f"{_mmm(r['baselines'][n])} | " for n in names)
        ratios = "".join(f"{r['ratios'][n]:.3f} | " for n in names)
        out.append(
            f"| {r['clients']} | {r.get('budget', '')} | {served} | {base}{r['ratio']:.3f} | "
            f"{r.get('fastest') or 'plain'} | {ratios}{_met(r['ratio'], target)} | {p50:.0f} | {p99:.0f} | "
            f"{p99 / p50 if p50 else 0:.2f} | {r.get('non_2xx', '')} | {r.get('mean_rows', 0):.1f} | "
            f"{r.get('worker_busy', 0):.0%} | {_loop_ms(r)} | {r.get('other_busy', 0):.2f} |"
        )
    return [*out, ""]


def abstain_block(speed: dict | None) -> list[str]:
    """What abstention rules cost a batch: throughput against the same batch without rules."""
    if not speed:
        return []
    hw, ratio, secs = speed["hardware"], speed["ratio_to_none"], speed["median_seconds"]
    out = [
        "### Abstention rules in a mixed batch (CPU)",
        "",
        f"Run: {hw['cpu']}, torch threads {speed['threads']}; command `{speed['command']}`. "
        f"`predict_batch` over {speed['profiles']} units profiles of {speed['labels']} labels, "
        f"{speed['rows_per_batch']} rows, the same texts with and without a rule on every profile; "
        f"medians of {speed['rounds']} rounds in rotating order.",
        "",
        "| rules | median s per batch | throughput against no rules |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {secs[name]:.4f} | {ratio[name]:.3f} |" for name in secs],
        "",
    ]
    return out


def serving_sections(
    gpu_check: dict | None,
    cpu_check: dict | None,
    single: dict | None,
    budgets: dict | None = None,
    abstain_speed: dict | None = None,
    single8: dict | None = None,
) -> list[str]:
    """Everything above that has data, GPU first."""
    lines: list[str] = []
    if gpu_check and gpu_check.get("meta", {}).get("device") == "cuda":
        lines += runtime_block(gpu_check, "cuda") + http_block(gpu_check, "cuda")
    if cpu_check:
        lines += runtime_block(cpu_check, "cpu") + http_block(cpu_check, "cpu")
    lines += single_block(single, budgets) + single_block(single8, None) + abstain_block(abstain_speed)
    if lines:
        lines = ["## Serving path", "", *lines]
    return lines
