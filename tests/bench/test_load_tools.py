"""The load test's pure pieces (bench/load): Zipf sampler, percentiles, metrics parsing, report rendering.

No server, Redis or model here, and no timing assertion: the measurements themselves are what
``python -m bench.load.run`` produces. The report tests render a small FAKE result built below.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import numpy as np
import pytest

# bench/ is not an installed package: `python -m pytest` finds it from the repository root, plain `pytest` not.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common.loadgen import check_loopback
from bench.common.server import batch_stats, parse_metrics
from bench.common.stats import ZipfSampler, latency_summary, percentile
from bench.load.report import memory_summary, render_markdown, storing_deltas, write_report


# -- Zipf -------------------------------------------------------------------------------------
def test_zipf_rank_probabilities_follow_the_power_law() -> None:
    z = ZipfSampler(1000, s=1.1, seed=0)
    p = z.rank_probabilities
    assert p.sum() == pytest.approx(1.0)
    assert p[0] / p[1] == pytest.approx(2**1.1)
    assert p[9] / p[99] == pytest.approx(10**1.1)
    assert np.all(np.diff(p) < 0)


def test_zipf_samples_match_the_distribution() -> None:
    z = ZipfSampler(500, s=1.1, seed=3)
    ranks = z.sample_ranks(200_000)
    assert ranks.min() >= 0 and ranks.max() < 500
    observed = np.bincount(ranks, minlength=500) / len(ranks)
    # the head, rank by rank, within a few standard errors
    for k in range(5):
        sd = math.sqrt(z.rank_probabilities[k] * (1 - z.rank_probabilities[k]) / len(ranks))
        assert abs(observed[k] - z.rank_probabilities[k]) < 5 * sd
    # and the shape as a whole: total variation distance is small
    assert 0.5 * np.abs(observed - z.rank_probabilities).sum() < 0.02
    assert z.top_share(50) == pytest.approx(observed[:50].sum(), abs=0.01)


def test_zipf_items_are_a_seeded_permutation_of_ranks() -> None:
    a, b = ZipfSampler(100, seed=7), ZipfSampler(100, seed=7)
    assert sorted(a.item_of_rank.tolist()) == list(range(100))
    assert np.array_equal(a.sample(1000), b.sample(1000))  # reproducible
    assert not np.array_equal(a.item_of_rank, ZipfSampler(100, seed=8).item_of_rank)
    # the most frequent item is the one mapped to rank 0
    items = ZipfSampler(100, seed=7).sample(20_000)
    assert np.bincount(items).argmax() == a.item_of_rank[0]


def test_zipf_edge_cases() -> None:
    assert ZipfSampler(1).sample(10).tolist() == [0] * 10
    uniform = ZipfSampler(4, s=0.0)
    assert uniform.rank_probabilities.tolist() == [0.25] * 4
    with pytest.raises(ValueError):
        ZipfSampler(0)


# -- percentiles ----------------------------------------------------------------------------------
def test_percentile_interpolates_like_numpy() -> None:
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for q in (0, 10, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([1, 2, 3, 4], 50) == 2.5  # by hand: halfway between 2 and 3
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_is_in_milliseconds() -> None:
    s = latency_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["count"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == pytest.approx(100.0)


def test_loopback_only() -> None:
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:1")
    with pytest.raises(ValueError):
        check_loopback("http://10.0.0.1:8000")


# -- server metrics -------------------------------------------------------------------------------
METRICS_BEFORE = """\
# TYPE xpeft_batch_rows histogram
xpeft_batch_rows_bucket{le="64.0"} 2.0
xpeft_batch_rows_count 2.0
xpeft_batch_rows_sum 40.0
xpeft_batch_profiles_count 2.0
xpeft_batch_profiles_sum 30.0
xpeft_batch_seconds_count 2.0
xpeft_batch_seconds_sum 0.5
xpeft_cache_events_total{cache="fused",event="hit"} 10.0
xpeft_cache_events_total{cache="fused",event="miss"} 30.0
"""
METRICS_AFTER = """\
xpeft_batch_rows_count 12.0
xpeft_batch_rows_sum 340.0
xpeft_batch_profiles_count 12.0
xpeft_batch_profiles_sum 230.0
xpeft_batch_seconds_count 12.0
xpeft_batch_seconds_sum 4.5
xpeft_cache_events_total{cache="fused",event="hit"} 190.0
xpeft_cache_events_total{cache="fused",event="miss"} 50.0
"""


def test_batch_stats_from_metric_deltas() -> None:
    before, after = parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER)
    assert before["xpeft_cache_events_total{cache=fused,event=hit}"] == 10.0
    stats = batch_stats(before, after, wall_s=5.0)
    assert stats["batches"] == 10
    assert stats["mean_rows"] == pytest.approx(30.0)
    assert stats["mean_distinct_profiles"] == pytest.approx(20.0)
    assert stats["mean_batch_ms"] == pytest.approx(400.0)
    assert stats["worker_busy"] == pytest.approx(0.8)
    assert stats["fused_hit_rate"] == pytest.approx(180 / 200)


# -- report (from a FAKE result, built here; no number in it was measured) ----------------------
def _fake_pass(label: str, seq_s: float, p50: float) -> dict:
    return {
        "label": label,
        "sent": 100,
        "ok": 100,
        "rows": 100,
        "statuses": {"200": 100},
        "wall_s": 100 / seq_s,
        "requests_per_s": seq_s,
        "sequences_per_s": seq_s,
        "stopped_by_deadline": False,
        "latency": {
            "count": 100,
            "p50_ms": p50,
            "p95_ms": 2 * p50,
            "p99_ms": 3 * p50,
            "mean_ms": p50,
            "max_ms": 4 * p50,
        },
        "server_batches": {
            "batches": 5,
            "mean_rows": 20.0,
            "mean_distinct_profiles": 15.0,
            "mean_batch_ms": 200.0,
            "worker_busy": 0.9,
            "mean_queue_wait_ms": 50.0,
            "profiles_fused": 10,
            "fused_hit_rate": 0.5,
            "overloaded": 0,
        },
        "cpu": {
            "server_cpu_s": 5.0,
            "load_gen_cpu_s": 1.0,
            "own_cpu_s": 1.0,
            "machine_busy_cpu_s": 8.0,
            "other_processes_cpu_s": 2.0,
            "machine_cores": 2.0,
            "load_avg_1m_before": 1.0,
            "server_cpu_ms_per_seq": 11.0,
            "load_gen_cpu_ms_per_seq": 2.0,
            "own_cpu_ms_per_seq": 2.0,
        },
        "rss": {"VmRSS": 600 * 2**20, "VmHWM": 610 * 2**20, "RssAnon": 300 * 2**20},
    }


def _fake_offline(label: str, seq_s: float) -> dict:
    return {
        "label": label,
        "rows": 100,
        "wall_s": 100 / seq_s,
        "sequences_per_s": seq_s,
        "batch_rows": 20,
        "batches": 5,
        "mean_rows": 20.0,
        "mean_distinct_profiles": 15.2,
        "mean_batch_ms": 150.0,
        "cpu": {
            "server_cpu_s": 0.0,
            "load_gen_cpu_s": 0.0,
            "own_cpu_s": 9.0,
            "machine_busy_cpu_s": 10.0,
            "other_processes_cpu_s": 1.0,
            "machine_cores": 2.0,
            "load_avg_1m_before": 1.0,
            "server_cpu_ms_per_seq": 0.0,
            "load_gen_cpu_ms_per_seq": 0.0,
            "own_cpu_ms_per_seq": 9.0,
        },
    }


def _rss(mib: float) -> dict:
    return {"VmRSS": int(mib * 2**20), "VmHWM": int(mib * 2**20), "RssAnon": int(mib * 2**20 / 2)}


def _fake_server(rss_mib: float, stored: int) -> dict:
    return {
        "rss_idle": _rss(rss_mib - 5),
        "rss_after_traffic": _rss(rss_mib),
        "traffic": {"sequences_per_s": 50.0},
        "profile_cache_entries": 100.0,
        "fused_cache_entries": 50.0,
        "fused_cache_bytes": 50 * 452160.0,
        "invalidations": {"put": float(stored), "resync": 1.0, "reset": 2.0},
    }


def _fake_stage(stored: int, rss_mib: float, rss_fixed_mib: float, bytes_per_profile: float) -> dict:
    return {
        "stored": stored,
        "insert_s": 1.0,
        "servers": {
            "default": _fake_server(rss_mib, stored),
            "mmap_threshold": _fake_server(rss_fixed_mib, stored),
        },
        "redis": {
            "sampled_keys": 10,
            "hash_bytes_mean": bytes_per_profile - 10,
            "hash_bytes_max": 2928,
            "index_bytes_total": 10 * stored,
            "index_bytes_per_profile": 10.0,
            "bytes_per_profile": bytes_per_profile,
            "xpm_bytes_mean": 1914.0,
            "meta_bytes_mean": 400.0,
            "encoding": "hashtable",
            "used_memory_delta_per_profile": 3100.0,
        },
    }


def fake_result() -> dict:
    """A FAKE load-test result, shaped like bench.load.run's output, with made-up round numbers."""
    return {
        "command": "python -m bench.load.run --fake",
        "started_at": "2000-01-01T00:00:00+00:00",
        "quick": False,
        "duration_s": 1.0,
        "git": {"commit": "0" * 40, "dirty": False},
        "hardware": {
            "cpu": "FAKE CPU",
            "logical_cpus": 2,
            "usable_cpus": 2,
            "memory_gib": 1.0,
            "platform": "fake",
            "python": "3",
            "torch": "2",
            "torch_default_threads": 2,
            "httpx": "0",
        },
        "config": {
            "profiles": 1000,
            "adapters": 100,
            "zipf_s": 1.1,
            "concurrency": 8,
            "texts_per_request": 1,
            "requests_per_pass": 100,
            "pass_deadline_s": 10.0,
            "warm_rounds": 2,
            "memory_stages": [1000, 100000],
            "memory_requests": 50,
            "memory_fused_cache_mib": 64,
            "memory_sample_keys": 10,
            "seed": 0,
            "torch_threads": 1,
            "redis_url": "redis://127.0.0.1:6379/13",
            "texts": "fake.tsv",
            "server_env": {},
        },
        "setup": {
            "bank_id": "fakebank",
            "model_id": "fakemodel",
            "L": 6,
            "N": 100,
            "d": 384,
            "r": 24,
            "k": 10,
            "xpm_bytes": 1914,
            "texts_source": "fake.tsv",
            "texts_available": 10,
            "server_settings": {"max_batch_size": 64},
            "server_env": {"XPEFT_TORCH_THREADS": "1"},
        },
        "throughput": {
            "prefix": "fake",
            "stored": 1000,
            "insert_s": 1.0,
            "server_startup_s": 5.0,
            "server_idle_rss": _rss(580),
            "plan": {
                "requests": 100,
                "distinct_profiles": 40,
                "top1_share": 0.2,
                "top100_share": 0.9,
                "expected_top100_share": 0.8,
                "mean_texts_chars": 50.0,
            },
            "http_cold": _fake_pass("http cold", 60.0, 300.0),
            "offline_cold": _fake_offline("offline cold", 100.0),
            "http_warm": [_fake_pass("http warm 1", 80.0, 200.0), _fake_pass("http warm 2", 90.0, 180.0)],
            "offline_warm": [_fake_offline("offline warm 1", 100.0), _fake_offline("offline warm 2", 100.0)],
            "summary": {
                "http_cold_seq_s": 60.0,
                "offline_cold_seq_s": 100.0,
                "ratio_cold": 0.6,
                "http_warm_seq_s": 85.0,
                "offline_warm_seq_s": 100.0,
                "ratio_warm": 0.85,
                "ratio_warm_rounds": [0.8, 0.9],
                "http_cold_requests_s": 60.0,
                "http_warm_requests_s": 85.0,
                "cold_latency": {"p50_ms": 300.0, "p95_ms": 600.0, "p99_ms": 900.0},
                "warm_latency_median_round": {"p50_ms": 190.0, "p95_ms": 380.0, "p99_ms": 570.0},
            },
            "put_check": {"profiles_checked": 3, "identical": True, "fields": ["data", "meta"]},
            "server_log_tail": [],
        },
        "memory": {
            "prefix": "fake",
            "variants": {
                "default": {"env": {}, "rss_before_any_profile": _rss(580)},
                "mmap_threshold": {
                    "env": {"MALLOC_MMAP_THRESHOLD_": "131072"},
                    "rss_before_any_profile": _rss(570),
                },
            },
            "stages": [_fake_stage(1000, 600.0, 590.0, 3030.0), _fake_stage(100000, 700.0, 600.0, 3040.0)],
            "fused_cache_capacity": 64 * 2**20,
            "profile_cache_capacity": 10000,
            "redis_server": {"redis_version": "7", "hash_max_listpack_value": "64"},
            "server_log_tail": {"default": ["WARNING fake line"], "mmap_threshold": []},
        },
    }


def test_memory_summary_of_the_fake_result() -> None:
    ms = memory_summary(fake_result()["memory"])
    assert ms["growth"] == 100 * 2**20
    assert ms["growth_share"] == pytest.approx(100 / 600)
    assert ms["growth_per_stored_profile"] == pytest.approx(100 * 2**20 / 99_000)
    assert not ms["flat"]  # +16.7 % is more than the 10 % allowed
    assert ms["redis_ok"] and ms["redis_max_bytes"] == 3040.0
    # storing alone: idle RSS minus the RSS before (stage 1: before any profile; stage 2: after stage 1's traffic)
    assert storing_deltas(fake_result()["memory"], "default") == [15 * 2**20, 95 * 2**20]
    fixed = memory_summary(fake_result()["memory"], "mmap_threshold")
    assert fixed["flat"] and fixed["growth_share"] == pytest.approx(10 / 590)


def test_report_renders_every_section_from_the_fake_result() -> None:
    text = render_markdown(fake_result(), {"throughput": "img/t.png", "memory": "img/m.png"})
    assert text.startswith("# Server load test\n")
    for needle in (
        "## Targets",
        "0.85× (85.0 against 100.0 sequences/s; cold 0.60×)",
        "**met**",
        "**missed**",
        "3,040 B",
        "600.0 → 700.0 MiB (+16.7%)",
        "`MALLOC_MMAP_THRESHOLD_=131072`",
        "FAKE CPU",
        "`python -m bench.load.run --fake`",
        "| http warm 2 | 100 | 90.0 | 90.0 | 180.0 | 360.0 | 540.0 |",
        "![throughput and latency](img/t.png)",
        "identical `data` and `meta`",
        "WARNING fake line",
        "## Analysis",
        "emptied their caches 2 and 2 times",
    ):
        assert needle in text, needle


def test_quick_results_are_labelled_and_missing_phases_are_left_out() -> None:
    result = copy.deepcopy(fake_result())
    result["quick"] = True
    del result["memory"]
    text = render_markdown(result, {})
    assert "quick smoke run: not a measurement" in text
    assert "## Memory" not in text and "![" not in text


def test_write_report_makes_the_doc_and_both_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    doc = tmp_path / "docs" / "LOAD_TEST.md"
    write_report(fake_result(), doc, tmp_path / "fake.json")
    assert (tmp_path / "docs" / "img" / "load_throughput.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "img" / "load_memory.png").stat().st_size > 1000
    assert "](img/load_memory.png)" in doc.read_text()
