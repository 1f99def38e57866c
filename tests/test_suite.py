"""The evaluation suite: plan, honest trained bank, resumable results file, deadline, report."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import xpeft.profiles.suite as suite
from xpeft.profiles.data import Dataset
from xpeft.profiles.suite import (
    ResultsFile,
    Suite,
    SuiteError,
    bank_slices,
    choose_hyperparameters,
    grid_specs,
    load_config,
    parse_config,
    read_results,
    train_adapters,
    tune_specs,
)
from xpeft.profiles.suite_report import bert_base_sizes, write_report

REPO = Path(__file__).resolve().parents[1]
GOOD = ["wonderful", "excellent", "delightful", "brilliant", "lovely", "superb", "great", "charming"]
BAD = ["awful", "terrible", "dreadful", "horrible", "boring", "dismal", "lousy", "painful"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a CPU shared with other busy processes, two threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Two tiny tasks the test writes itself: single sentences, and sentence pairs."""
    root = tmp_path_factory.mktemp("data")
    frames = ["the film was {}", "a {} meal", "this book is {}", "what a {} day"]
    sent = [
        [f.format(w), lab]
        for f in frames
        for g, b in zip(GOOD, BAD, strict=True)
        for w, lab in ((g, "1"), (b, "0"))
    ]
    _write(root / "sent" / "train.tsv", ["sentence", "label"], sent[:48])
    _write(root / "sent" / "dev.tsv", ["sentence", "label"], sent[48:])
    pairs = [
        [f"the {w} cat sat", f"a {v} cat", "entailment" if w == v else "not_entailment"]
        for w in GOOD[:6]
        for v in (w, BAD[GOOD.index(w)])
    ]
    _write(
        root / "pair" / "train.tsv",
        ["index", "sentence1", "sentence2", "label"],
        [[str(i), *p] for i, p in enumerate(pairs * 2)],
    )
    _write(
        root / "pair" / "dev.tsv",
        ["index", "sentence1", "sentence2", "label"],
        [[str(i), *p] for i, p in enumerate(pairs[:8])],
    )
    return root


TINY = {
    "name": "test-tiny",
    "purpose": "unit test",
    "device": "cpu",
    "eval_batch_size": 16,
    "tasks": {
        "sent": {
            "title": "Sent",
            "train": "sent/train.tsv",
            "dev": "sent/dev.tsv",
            "train_size": 16,
            "max_length": 16,
            "epochs": 1,
            "batch_size": 8,
            "curve_every": 1,
            "curve_dev_size": 8,
        },
        "pair": {
            "title": "Pair",
            "train": "pair/train.tsv",
            "dev": "pair/dev.tsv",
            "text_col": "sentence1",
            "text_pair_col": "sentence2",
            "train_size": 16,
            "max_length": 24,
            "epochs": 1,
            "batch_size": 8,
        },
    },
    "random_bank": {"n": 4},
    "trained_bank": {
        "n": 2,
        "source": {"sent": "pair", "pair": "sent"},
        "slice_size": 4,
        "epochs": 1,
        "batch_size": 4,
        "adapters_per_step": 2,
    },
    "tune": {
        "task": "sent",
        "train_size": 12,
        "holdout_size": 8,
        "epochs": 1,
        "grid": {"hard": {"lr_scores": [0.05, 0.2]}},
    },
    "main": {"tasks": ["sent", "pair"], "seeds": [0, 1]},
    "sweeps": {"task": "sent", "n": [4, 8], "k_fractions": [0.25, 0.5], "methods": ["hard"], "seeds": [0]},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, encoder, data_root) -> tuple[Path, Suite]:
    """The tiny grid, run once to the end (shared by the tests that read its results)."""
    out = tmp_path_factory.mktemp("run") / "results.jsonl"
    s = Suite(parse_config(TINY), out, data_root=str(data_root), encoder=encoder, progress=False)
    assert s.run() == "complete"
    return out, s


def _plan_keys(config) -> list[str]:
    chosen, _ = choose_hyperparameters(config, {})
    return [s.key() for s in tune_specs(config) + grid_specs(config, chosen)]


# -- config and plan ----------------------------------------------------------------------------
def test_config_refuses_a_bank_trained_on_the_evaluated_task():
    bad = copy.deepcopy(TINY)
    bad["trained_bank"]["source"]["sent"] = "sent"
    with pytest.raises(SuiteError, match="must not train its bank"):
        parse_config(bad)
    typo = copy.deepcopy(TINY)
    typo["tasks"]["sent"]["epoch"] = 2
    with pytest.raises(SuiteError, match="unknown key"):
        parse_config(typo)


def test_gpu_plan_runs_main_seeds_first_and_merges_duplicates():
    config = load_config(REPO / "bench" / "eval" / "gpu.json")
    chosen, _ = choose_hyperparameters(config, {})
    grid = grid_specs(config, chosen)
    keys = [s.key() for s in grid]
    assert len(keys) == len(set(keys))
    main = [i for i, s in enumerate(grid) if "main" in s.groups]
    sweep_only = [i for i, s in enumerate(grid) if s.groups == ("sweep",)]
    assert max(main) < min(sweep_only)  # the whole main table comes before the sweeps
    seeds = [grid[i].seed for i in main]
    assert seeds == sorted(seeds)
    # 2 tasks x (2 baselines + 2 methods x 2 banks) x 3 seeds
    assert len(main) == 2 * (2 + 2 * 2) * 3
    # the sweep's N=100, k=10 point is the main seed-0 run (curves included), not a second run
    shared = [
        s for s in grid if "sweep" in s.groups and "main" in s.groups and s.method == "hard" and s.seed == 0
    ]
    assert shared and shared[0].curve_every > 0
    # every trained-bank run of a task uses a bank built from the other task
    for s in grid:
        if s.bank == "trained":
            assert s.bank_sig.startswith(f"trained:{config.trained_bank.source[s.task]}:")
            assert config.trained_bank.source[s.task] != s.task


def test_bank_slices_are_disjoint_when_the_source_allows():
    mode, slices = bank_slices(1000, 10, 50, seed=0)
    assert mode == "disjoint"
    flat = [i for s in slices for i in s]
    assert len(flat) == len(set(flat)) == 500
    mode, slices = bank_slices(100, 10, 50, seed=0)
    assert mode == "random"
    assert all(len(s) == len(set(s)) == 50 for s in slices)
    assert len({tuple(s) for s in slices}) == 10


def test_batched_adapters_train_independently(encoder):
    """Adapter 0 trained beside adapter 1 equals adapter 0 trained alone: no cross-talk."""
    a = Dataset(["a lovely film", "a dull film", "great fun", "awful mess"], ["1", "0", "1", "0"])
    b = Dataset([("x", "y"), ("the cat", "a cat"), ("p", "q"), ("dog", "dog")], ["0", "1", "0", "1"])
    kw = dict(
        bottleneck=24,
        epochs=2,
        batch_size=2,
        lr_adapter=1e-2,
        lr_head=1e-2,
        max_length=16,
        seed=3,
        dropout=False,
    )
    together = train_adapters(encoder, [a, b], [0, 1], **kw)
    alone = train_adapters(encoder, [a], [0], **kw)
    for name in ("down_bias", "up", "up_bias"):  # these start at zero: the tensor is the update
        t, o = together[0].adapter[name], alone[0].adapter[name]
        # equal up to float noise (padding differs), which Adam turns into at most a few tiny steps
        assert (t - o).norm() < 1e-2 * o.norm(), name
    torch.testing.assert_close(together[0].adapter["down"], alone[0].adapter["down"], atol=1e-3, rtol=0)
    assert together[0].adapter["up"].abs().max() > 0  # it trained (up starts at zero)
    assert not torch.allclose(together[0].adapter["up"], together[1].adapter["up"])


# -- sizes -----------------------------------------------------------------------------------------
def test_masks_alone_ratio_is_measured_on_encoded_profiles(finished):
    out, _ = finished
    hard = [r for r in read_results(out) if r.get("type") == "run" and r["method"] == "hard"]
    for r in hard:
        L, N = r["num_layers"], r["n"]
        assert r["selection_bytes"] == 2 * ((L * N + 7) // 8)
        assert r["head_bytes"] == 2 * (r["num_labels"] * r["hidden_size"] + r["num_labels"])
        assert r["profile_bytes"] == r["selection_bytes"] + r["head_bytes"] + r["header_bytes"]
    bert = bert_base_sizes(100, 10)
    assert bert["selection_bytes"] == 300  # 2 x 12 x 100 bits
    assert bert["adapter_fp32_bytes"] / bert["selection_bytes"] > 10_000


# -- the grid, resumability, deadline --------------------------------------------------------------
def test_tiny_grid_completes_with_one_row_per_planned_run(finished):
    out, s = finished
    rows = read_results(out)
    runs = [r for r in rows if r.get("type") in ("run", "tune")]
    assert sorted(r["key"] for r in runs) == sorted(_plan_keys(s.config))
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n_eval"] > 0 and r["train_seconds"] > 0
        assert r["steps"] == len(r["curve"]) or not r["includes_curve_evals"]
    curves = [r for r in runs if "curves" in r["groups"]]
    assert {r["method"] for r in curves} == {"hard", "soft"}
    assert all(any("eval_accuracy" in p for p in r["curve"]) for r in curves)
    banks = [r for r in rows if r.get("type") == "bank"]
    assert {(b["for_task"], b["source_task"]) for b in banks} == {("sent", "pair"), ("pair", "sent")}
    ends = [r for r in rows if r.get("type") == "session" and r["event"] == "end"]
    assert ends[-1]["reason"] == "complete"


def test_resume_redoes_only_the_missing_runs(finished, encoder, data_root, tmp_path, monkeypatch):
    out, s = finished
    lines = out.read_text().splitlines()
    run_lines = [i for i, line in enumerate(lines) if '"type":"run"' in line]
    dropped = {json.loads(lines[i])["key"] for i in run_lines[-3:]}
    kept = [line for i, line in enumerate(lines) if i not in run_lines[-3:]]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(kept) + "\n" + lines[run_lines[-1]][:57])  # a line cut by a kill
    calls = []
    real = suite.train_profile

    def counting(*args, **kwargs):
        calls.append(args[3].method)
        return real(*args, **kwargs)

    monkeypatch.setattr(suite, "train_profile", counting)
    again = Suite(
        s.config, partial, data_root=str(data_root), encoder=encoder, work_dir=s.work_dir, progress=False
    )
    assert again.run() == "complete"
    assert len(calls) == 3
    rows = read_results(partial)
    keys = [r["key"] for r in rows if r.get("type") in ("run", "tune")]
    assert sorted(keys) == sorted(_plan_keys(s.config))  # every run once, the cut line gone
    assert dropped <= set(keys)
    assert partial.read_text().endswith("\n")
    assert not [r for r in rows if r.get("type") == "bank" and r["session"] == again.session]  # banks reused


def test_deadline_and_max_runs_stop_cleanly(encoder, data_root, tmp_path):
    out = tmp_path / "r.jsonl"
    s = Suite(parse_config(TINY), out, data_root=str(data_root), encoder=encoder, max_runs=2, progress=False)
    assert s.run() == "max_runs"
    assert len([r for r in read_results(out) if r.get("type") in ("run", "tune")]) == 2
    late = Suite(
        parse_config(TINY),
        out,
        data_root=str(data_root),
        encoder=encoder,
        deadline_seconds=0.5,
        progress=False,
    )
    assert late.run() == "deadline"
    rows = read_results(out)
    assert (
        len([r for r in rows if r.get("type") in ("run", "tune")]) == 2
    )  # nothing started past the deadline
    assert rows[-1]["event"] == "end" and rows[-1]["reason"] == "deadline"


def test_results_file_keeps_whole_lines_only(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"type":"run","key":"a","accuracy":0.5}\n{"type":"run","key":"b"}\n{"type":"ru')
    results = ResultsFile(path)
    assert set(results.done()) == {"a", "b"}
    results.append({"type": "run", "key": "c"})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_killed_process_resumes_without_redoing_finished_runs(encoder, data_root, tmp_path, monkeypatch):
    """SIGKILL the command mid-grid, then resume: finished runs stay finished."""
    config = copy.deepcopy(TINY)
    config["sweeps"] = None
    config["main"]["seeds"] = [0]
    config["main"]["banks"] = ["random"]
    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xpeft.profiles.suite",
            "run",
            "--config",
            str(config_path),
            "--out",
            str(out),
            "--data-root",
            str(data_root),
            "--no-progress",
            "--threads",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count('"type":"run"') >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the grid finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = {r["key"] for r in read_results(out) if r.get("type") in ("run", "tune")}
    assert len(before) >= 4  # 2 search runs and at least 2 main runs finished
    trained = []
    real = suite.train_profile

    def counting(encoder_, bank, train, cfg, **kwargs):
        trained.append(cfg.method)
        return real(encoder_, bank, train, cfg, **kwargs)

    monkeypatch.setattr(suite, "train_profile", counting)
    s = Suite(parse_config(config), out, data_root=str(data_root), encoder=encoder, progress=False)
    assert s.run() == "complete"
    keys = [r["key"] for r in read_results(out) if r.get("type") in ("run", "tune")]
    assert len(keys) == len(set(keys)) == len(_plan_keys(s.config))
    assert len(trained) == len(keys) - len(before)


# -- the report ----------------------------------------------------------------------------------
def test_report_renders_tables_plots_and_targets_from_the_rows(finished, tmp_path):
    out, _ = finished
    md = write_report(
        out, tmp_path / "docs" / "EVALUATION.md", command="python -m xpeft.profiles.suite report"
    )
    text = md.read_text()
    for heading in (
        "## Targets",
        "## Main table",
        "## Profile size",
        "## Sweeps over N and k",
        "## Training curves",
        "## The trained bank",
        "## Choices",
        "## Hardware and time",
    ):
        assert heading in text
    for name in ("eval_accuracy_vs_n.png", "eval_accuracy_vs_k.png", "eval_curves_sent.png"):
        png = tmp_path / "docs" / "img" / name
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"(img/{name})" in text
    rows = [r for r in read_results(out) if r.get("type") == "run" and "main" in r["groups"]]
    head = [r["accuracy"] for r in rows if r["task"] == "sent" and r["method"] == "head_only"]
    mean = 100 * sum(head) / len(head)
    assert f"{mean:.2f} ± " in text  # the table's number is the rows' mean
    masks_row = next(line for line in text.splitlines() if line.startswith("| masks alone"))
    assert "**met**" in masks_row  # N=4, L=6: 6 bytes of masks against a 452,160-byte fp32 adapter
