"""The load test's two plots (throughput per pass, memory per stage) for docs/LOAD_TEST.md."""

from __future__ import annotations

from pathlib import Path

from bench.load.analysis import MIB, TARGET_REDIS_BYTES


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
