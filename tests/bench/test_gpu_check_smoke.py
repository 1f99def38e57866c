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
from xpeft.profiles.profile import ProfileKind  # noqa: E402
from xpeft.training.train_config import ABSTAIN_SCORES, DEFAULT_ABSTAIN_SCORE  # noqa: E402


def test_cpu_quick_run_checks_and_times_the_serving_path(tmp_path, monkeypatch) -> None:
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "STARTED", time.monotonic())
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:  # main() sets process-wide torch state (threads, no grad) for its own run
        status = gpu_check.main(
            ["--cpu", "--quick", "--no-http", "--no-user-serve", "--budget", "120", "--out", str(tmp_path)]
        )
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert status == 0 and report["status"] == "ok" and not report.get("errors")
    runtime_checks = [c for c in report["checks"] if c["check"] == "runtime"]
    assert [c["path"] for c in runtime_checks] == ["cold", "warm", "warm again"]
    assert all(c["passed"] and c["labels_equal"] for c in runtime_checks)
    # a profile of every kind under no rule and under each score, every rule's confidence compared
    every = len(ProfileKind) * (1 + len(ABSTAIN_SCORES))
    assert all(c["profiles"] == every and c["confidence_missing"] == 0 for c in runtime_checks)
    assert all(set(c["confidence_err"]) == set(ABSTAIN_SCORES) for c in runtime_checks)
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


def test_user_serve_trains_uploads_and_predicts_over_http(tmp_path) -> None:
    """The ``user_serve`` step on the CPU: ``xpeft`` commands only, profiles trained with the
    defaults (one epoch here), offline and by the server's training service, answers over HTTP
    equal to the CPU reference's, the rule's confidence included."""
    from bench.gpu_user import user_serve

    result = user_serve("minilm", tmp_path, time.monotonic() + 240, ["--epochs", "1"])
    assert result["passed"] and result["device"] == "cpu"
    assert result["default_rule"] == result["service_rule"] == DEFAULT_ABSTAIN_SCORE
    assert {(c["profile"], c["min_confidence"]) for c in result["checks"]} == {
        ("default", None),
        ("default", 0.99),
        ("service", None),
        ("service", 0.99),
    }
    assert all(c["rule_answered"] and c["max_score_err"] < 1e-3 for c in result["checks"])
    assert '"confidence"' in result["cli_predict"]


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


def test_profile_top_frames_and_the_single_text_tables() -> None:
    from bench.load.single import thread_shares, top_frames

    collapsed = (
        "thread (0x7f01): xpeft-model_0;run (worker.py:9);forward (linear.py:134) 30\n"
        "thread (0x7f02): MainThread;serve (app.py:3);send (h11.py:5) 10\n"
        "thread (0x7f01): xpeft-model_0;run (worker.py:9);forward (linear.py:134) 20\n"
    )
    total, top = top_frames(collapsed)
    assert total == 60
    assert top[0] == {"frame": "xpeft-model_0 | forward (linear.py:134)", "share": 50 / 60}
    assert top[1]["frame"] == "MainThread | send (h11.py:5)"
    assert thread_shares(collapsed) == {"xpeft-model_0": 50 / 60, "MainThread": 10 / 60}
    run = {
        "clients": 128,
        "budget": 512,
        "wrk": {"min": 170.0, "median": 180.0, "max": 190.0},
        "baselines": {
            "torch": {"min": 150.0, "median": 160.0, "max": 170.0},
            "onnx-int8": {"min": 190.0, "median": 200.0, "max": 210.0},
        },
        "ratios": {"torch": 180 / 160, "onnx-int8": 0.9},
        "fastest": "onnx-int8",
        "other_busy": 0.05,
        "wrk_seq_per_s": 180.0,
        "plain_seq_per_s": 200.0,
        "ratio": 0.9,
        "p50_ms": 100.0,
        "p99_ms": 250.0,
        "non_2xx": 0,
        "mean_rows": 14.0,
        "worker_busy": 0.95,
        "loop_ms_per_request": 0.3,
        "python_generator": {"sequences_per_s": 120.0},
    }
    config = {"threads": 0, "profiles": 32, "seconds": 15, "rounds": 3, "plain_batch": 32, "clients": [128]}
    single = {
        "config": config,
        "hardware": {"cpu": "some CPU", "usable_cpus": 2},
        "command": "python -m bench.load.single",
        "runs": [run],
        "profile": {
            "svg": "serving-flame.svg",
            "samples": 60,
            "top": top,
            "threads": thread_shares(collapsed),
        },
    }
    budgets = {
        **single,
        "command": "python -m bench.load.single --budgets 512",
        "runs": [{k: v for k, v in {**run, "ratio": 0.7}.items() if k != "loop_ms_per_request"}],
    }
    text = "\n".join(serving_report.single_block(single, budgets))
    row = (
        "| 128 | 512 | 170 / 180 / 190 | 150 / 160 / 170 | 190 / 200 / 210 | 0.900 | onnx-int8 | 1.125 | 0.900 | "
        "yes | 100 | 250 | 2.50 | 0 | 14.0 | 95% | 0.30 | 0.05 |"
    )
    assert row in text
    assert "| 14.0 | 95% |  | 0.05 |" in text  # a run from before the loop's CPU was measured
    assert "Samples by thread: `xpeft-model_0` 83.3%, `MainThread` 16.7%." in text
    assert "| 0.700 | onnx-int8 | 1.125 | 0.900 |  |" in text  # the sweep has no target column filled
    assert "img/serving-flame.svg" in text and "`xpeft-model_0 | forward (linear.py:134)`" in text


def test_abstention_cost_table() -> None:
    speed = {
        "command": "python -m bench.abstain_speed",
        "hardware": {"cpu": "some CPU"},
        "threads": 1,
        "profiles": 8,
        "labels": 15,
        "rows_per_batch": 64,
        "rounds": 15,
        "median_seconds": {"none": 0.2, "cosine": 0.25},
        "ratio_to_none": {"none": 1.0, "cosine": 0.8},
    }
    text = "\n".join(serving_report.abstain_block(speed))
    assert "| cosine | 0.2500 | 0.800 |" in text and "8 units profiles of 15 labels, 64 rows" in text
    assert serving_report.abstain_block(None) == []


def test_benchmarks_doc_says_what_the_gpu_run_does_not_cover() -> None:
    """The GPU note at the top of BENCHMARKS.md: every uncovered part while the GPU JSON lacks it,
    none once a GPU gpu_check run holds each; a CPU gpu_check run covers nothing of the GPU's."""
    from bench.gpu_age import age_note, measured_commit, uncovered

    every = uncovered({"meta": {}}, None)
    assert len(every) == 6 and any("abstention rules" in m for m in every)
    assert uncovered({"meta": {}}, {"meta": {"device": "cpu"}, "checks": [{"check": "runtime"}]}) == every
    covered = {
        "meta": {"device": "cuda"},
        "checks": [
            {"check": "runtime", "confidence_err": {"cosine": 0.0}},
            {"check": "user_serve"},
        ],
        "runtime": [{"variant": "cold_units", "ratio_to_base": 1.0}],
        "http": {"passes": []},
    }
    assert uncovered({"meta": {}}, covered) == []
    assert measured_commit({"meta": {"git": "abc1234"}}, Path("x")) == ("abc1234", "recorded by the run")
    note = age_note({"meta": {"git": "abc1234"}}, None, Path("x"), Path("y"))
    assert note[0].startswith("> **The GPU figures below predate the current serving path.**")
    assert "`abc1234`" in note[0] and all(f"> - {m}" in note for m in every)
    assert age_note({"meta": {"git": "abc1234"}}, covered, Path("x"), Path("y"))[0] == (
        "The GPU figures below were measured on commit `abc1234` (recorded by the run)."
    )


def test_load_test_doc_shows_the_gpu_http_run_once_there_is_one() -> None:
    from bench.load.report import gpu_section

    assert "No GPU run of the HTTP load yet" in "\n".join(gpu_section(None))
    meta = {"device": "cuda", "command": "python bench/gpu_check.py", "date": "d", "git": "abc1234"}
    passes = [
        {
            "pass": 0,
            "http_seq_per_s": 900.0,
            "offline": {"seq_per_s": 1000.0},
            "ratio": 0.9,
            "latency": {"p50_ms": 20.0, "p99_ms": 60.0},
            "server_batches": {"mean_rows": 40.0, "worker_busy": 0.8},
            "bottleneck": "the model worker",
        }
    ]
    http = {"profiles": 64, "texts_per_request": 8, "clients": 128, "generator": "loadgen", "passes": passes}
    cpu_run = gpu_section({"meta": {**meta, "device": "cpu", "hardware": "h"}, "http": http})
    assert "No GPU run" in "\n".join(cpu_run)
    text = "\n".join(gpu_section({"meta": {**meta, "hardware": "H100"}, "http": http}))
    assert "`abc1234`" in text and "| 0 | 900 | 1000 | 0.900 | 20.0 | 60.0 | 40.0 | 80% | yes |" in text
