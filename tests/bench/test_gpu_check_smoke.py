"""bench/gpu_check.py must work before GPU time is spent on it: its CPU quick mode, end to end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import serving, serving_report  # noqa: E402
from bench.common.wrk import wrk_result  # noqa: E402


def test_cpu_quick_run_checks_and_times_the_serving_path(tmp_path, monkeypatch) -> None:
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic())
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:  # main() sets process-wide torch state (threads, no grad) for its own run
        status = gpu_check.main(["--cpu", "--quick", "--no-http", "--budget", "120", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and report["status"] == "ok" and not report.get("errors")
    runtime_checks = [c for c in report["checks"] if c["check"] == "runtime"]
    assert [c["path"] for c in runtime_checks] == ["cold", "warm", "warm again"]
    assert all(c["passed"] and c["labels_equal"] for c in runtime_checks)
    rows = [r for r in report["runtime"] if "ratio_to_base" in r]
    assert {(r["variant"], r["distinct"]) for r in rows} >= {
        ("base", 1),
        ("cold", 1),
        ("warm", 8),
        ("cold", 8),
    }
    assert all(r["ms"] > 0 and r["ratio_to_base"] > 0 for r in rows)
    bench = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert any(r.get("variant") == "cold" for r in bench["throughput"])
    table = "\n".join(serving_report.serving_sections(None, report, None))
    assert "## Serving path" in table and "| 1 | 100 | cold | 8 | 16 |" in table


def test_http_check_serves_and_compares_with_offline(encoder) -> None:
    """One short pass of ``xpeft serve`` under load against the same requests offline."""
    result = serving.http_vs_offline(
        encoder,
        "minilm",
        clients=4,
        requests=16,
        texts_per_request=2,
        profiles=3,
        seq_len=12,
        passes=1,
        env={"XPEFT_TORCH_THREADS": "1"},
        pass_deadline_s=30,
    )
    (run,) = result["passes"]
    assert run["ok"] == run["sent"] == 16 and run["statuses"] == {"200": 16}
    assert run["http_seq_per_s"] > 0 and run["offline"]["seq_per_s"] > 0
    assert run["ratio"] == pytest.approx(run["http_seq_per_s"] / run["offline"]["seq_per_s"])
    assert run["latency"]["p50_ms"] <= run["latency"]["p99_ms"]
    assert run["server_batches"]["batches"] >= 1 and run["bottleneck"]


def test_bottleneck_names_the_saturated_side() -> None:
    assert "model worker" in serving.bottleneck({"worker_busy": 0.95}, 10.0, 10.0, 1)
    assert "event loop" in serving.bottleneck({"worker_busy": 0.3}, 13.0, 10.0, 1)
    assert "do not keep batches full" in serving.bottleneck({"worker_busy": 0.3}, 4.0, 10.0, 1)


def test_wrk_output_is_parsed() -> None:
    out = """Running 15s test @ http://127.0.0.1:8000
  1 threads and 32 connections
  Latency Distribution
     50%   81.23ms
     90%  120.50ms
     99%    1.20s
  5000 requests in 15.01s, 1.20MB read
  Non-2xx or 3xx responses: 3
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:    333.11
"""
    r = wrk_result(out, 15)
    assert r["requests"] == 5000 and r["non_2xx"] == 3 and r["socket_errors"] == 3
    assert r["latency"] == {"p50_ms": 81.23, "p90_ms": 120.5, "p99_ms": 1200.0}
    assert r["requests_per_s"] == pytest.approx(5000 / 15.01)
