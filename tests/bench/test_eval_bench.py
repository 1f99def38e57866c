"""The quality benchmark (bench/eval): config checks, plan, selections, donors, results, stats, e2e."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from scipy import stats as sps

from bench.eval.__main__ import main
from bench.eval.banks import donor_texts, donors, stack_donors, train_donor
from bench.eval.config import ConfigError, TrainedBankSpec, load_config, parse_config
from bench.eval.plan import build_plan
from bench.eval.results import ResultsFile, read_results
from bench.eval.stats import t_interval
from bench.eval.tasks import TaskData, texts

REPO = Path(__file__).resolve().parents[2]
DOMAINS = {"bank": ["balance", "transfer", "freeze"], "home": ["lights", "alarm", "oven"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a CPU shared with other busy processes, more threads run slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared data's folder layout with tiny content: SST-2 and a 2-domain, 6-intent CLINC."""
    root = tmp_path_factory.mktemp("data")
    good, bad = ["great", "lovely", "superb", "charming"], ["awful", "dreadful", "boring", "dismal"]
    frames = ["the film was {}", "a {} meal", "this book is {}", "what a {} day"]
    sst = [[f.format(w), lab] for f in frames for ws, lab in ((good, "1"), (bad, "0")) for w in ws]
    _write(root / "sst2" / "train.tsv", ["sentence", "label"], sst[::2] + sst[1::4])
    _write(root / "sst2" / "dev.tsv", ["sentence", "label"], sst[3::4])
    splits: dict[str, list[list[str]]] = {"train": [], "dev": [], "test": []}
    for domain, intents in DOMAINS.items():
        for intent in intents:
            for split, n in (("train", 12), ("dev", 3), ("test", 4)):
                splits[split] += [[f"{split} {intent} please number {i}", intent, domain] for i in range(n)]
    splits["test"].append(["train balance please number 0", "balance", "bank"])  # leaked: must be dropped
    for split, rows in splits.items():
        _write(root / "clinc150" / f"{split}.tsv", ["sentence", "label", "domain"], rows)
        for domain in DOMAINS:
            mine = [r[:2] for r in rows if r[2] == domain]
            _write(root / "clinc150" / "domains" / domain / f"{split}.tsv", ["sentence", "label"], mine)
    return root


def _config(**changes: object) -> dict:
    base: dict = {
        "name": "t",
        "methods": ["head_only", "single_adapter", "soft", "hard"],
        "banks": ["random", "trained"],
        "seeds": [0, 1],
        "tasks": [
            {"kind": "sst2"},
            {"kind": "clinc_fewshot", "shots": 2},
            {"kind": "clinc_customers", "count": 3, "min_intents": 2, "max_intents": 4},
        ],
    }
    base.update(changes)
    return base


# -- config -----------------------------------------------------------------------------------
def test_shipped_configs_load() -> None:
    for name in ("smoke", "cpu", "gpu"):
        config = load_config(REPO / "bench" / "eval" / f"{name}.json")
        assert config.variants[0].name == "default" and config.variants[0].train == {}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"variants": {"v": {"train": {"no_such_field": 1}}}},
            r"variants\.v .*TrainConfig refuses.*no_such_field",
        ),
        ({"train": {"seed": 3}}, r"'seed'.*set by the task and the run"),
        ({"tasks": [{"kind": "imdb"}]}, r"tasks\[0\]: unknown task kind 'imdb'"),
        (
            {"tasks": [{"kind": "sst2", "train_size": 0}]},
            r"tasks\[0\]: train_size must be a positive integer",
        ),
        ({"tasks": [{"kind": "sst2", "epochs": "3"}]}, r"epochs must be a positive integer"),
        ({"tasks": [{"kind": "clinc_fewshot"}]}, r"clinc_fewshot needs 'shots'"),
        ({"tasks": [{"kind": "sst2", "trian_size": 5}]}, r"unknown key\(s\) \['trian_size'\]"),
        ({"methods": ["hard", "lora"]}, r"methods \['lora'\] not allowed"),
        ({"variants": {"v": {"bank": {"init_scale": 0.5}}}}, r"do not apply to the trained bank"),
        ({"variants": {"v": {"seeds": [7]}}}, r"seeds \[7\] are not in the config's seeds"),
    ],
)
def test_config_errors_are_clear(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(**change))


def test_variant_overrides_reach_train_config() -> None:
    config = parse_config(
        _config(variants={"v": {"banks": ["random"], "train": {"k": 3}, "bank": {"init_scale": 0.5}}})
    )
    v = config.variant("v")
    assert v.train == {"k": 3} and v.bank == {"init_scale": 0.5} and v.methods == ("hard",)


# -- plan -------------------------------------------------------------------------------------
def test_plan_keys_stable_and_baselines_once(data_root: Path) -> None:
    config = parse_config(_config(variants={"v": {"banks": ["random"], "train": {"k": 3}}}))
    plan = build_plan(config, TaskData(data_root))
    keys = [s.key for s in plan]
    assert keys == [s.key for s in build_plan(config, TaskData(data_root))]
    assert len(set(keys)) == len(keys)
    assert keys[:6] == [
        "sst2/sst2/head_only/none/default/s0",
        "sst2/sst2/single_adapter/none/default/s0",
        "sst2/sst2/soft/random/default/s0",
        "sst2/sst2/hard/random/default/s0",
        "sst2/sst2/soft/trained/default/s0",
        "sst2/sst2/hard/trained/default/s0",
    ]
    profiles = 1 + len(DOMAINS) + 3
    assert sum(s.method == "head_only" for s in plan) == profiles * 2  # not once per bank
    assert sum(s.method == "hard" and s.variant == "default" for s in plan) == profiles * 2 * 2
    first_v = next(i for i, s in enumerate(plan) if s.variant == "v")
    assert all(s.variant == "default" for s in plan[:first_v]) and plan[-1].variant == "v"
    assert {s.bank for s in plan if s.variant == "v"} == {"random"}
    only = build_plan(config, TaskData(data_root), only_variants=["v"], only_tasks=["sst2"])
    assert [s.key for s in only] == ["sst2/sst2/hard/random/v/s0", "sst2/sst2/hard/random/v/s1"]


# -- selections and donors --------------------------------------------------------------------
def test_customers_and_fewshot_are_seeded(data_root: Path) -> None:
    config = parse_config(_config())
    fewshot, customers = config.tasks[1], config.tasks[2]
    a, b = TaskData(data_root), TaskData(data_root)
    for spec in (fewshot, customers):
        for x, y in zip(a.profiles(spec), b.profiles(spec), strict=True):
            assert (x.train, x.dev) == (y.train, y.dev)
    for p in a.profiles(fewshot):
        counts = {label: p.train.labels.count(label) for label in set(p.train.labels)}
        assert set(counts.values()) == {2} and len(counts) == 3
    intents = [set(p.train.labels) for p in a.profiles(customers)]
    assert all(2 <= len(i) <= 4 for i in intents) and len({frozenset(i) for i in intents}) > 1
    assert all(set(p.dev.labels) == set(p.train.labels) for p in a.profiles(customers))
    other = parse_config(_config(tasks=[{"kind": "clinc_fewshot", "shots": 2, "subset_seed": 5}])).tasks[0]
    assert [p.train for p in a.profiles(other)] != [p.train for p in a.profiles(fewshot)]


def test_donors_never_see_evaluated_data(data_root: Path) -> None:
    spec = TrainedBankSpec(num_adapters=4, min_intents=2, max_intents=3)
    data = TaskData(data_root)
    found = donors(spec, data)
    assert [d.intents for d in found] == [d.intents for d in donors(spec, TaskData(data_root))]
    assert sum(d.dropped for d in found) == sum("balance" in d.intents for d in found)  # the leaked line
    config = parse_config(_config())
    evaluated: set[str] = set()
    for task in config.tasks:
        for p in data.profiles(task):
            evaluated |= texts(p.train) | texts(p.dev)
    assert donor_texts(spec, data) and not donor_texts(spec, data) & evaluated


def test_trained_bank_stacks_library_trained_donors(data_root: Path) -> None:
    from xpeft.adapters.encoder import load_encoder

    encoder = load_encoder("minilm")
    spec = TrainedBankSpec(
        num_adapters=2, min_intents=2, max_intents=2, max_length=12, epochs=1, batch_size=8
    )
    trained = [train_donor(encoder, spec, d) for d in donors(spec, TaskData(data_root))]
    bank, info = stack_donors(encoder, spec, trained)
    assert bank.num_adapters == 2 and bank.model_id == encoder.model_id
    assert torch.equal(bank.up[:, 1], trained[1]["adapter"]["up"].float())
    assert info["donors"] == 2 and info["donor_examples"] == sum(d["stats"]["examples"] for d in trained)


# -- results and stats ------------------------------------------------------------------------
def test_results_resume_and_truncated_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    f = ResultsFile(path)
    f.append({"type": "run", "key": "a", "accuracy": float("nan")})
    f.append({"type": "session", "event": "start"})
    with path.open("a") as handle:
        handle.write('{"type": "run", "key": "b", "accu')  # a kill in the middle of a write
    again = ResultsFile(path)
    assert again.done() == {"a"} and again.rows[0]["accuracy"] is None
    again.append({"type": "run", "key": "c"})
    assert [r.get("key") for r in read_results(path)] == ["a", None, "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_paired_interval_matches_scipy() -> None:
    diffs = [0.012, -0.004, 0.031, 0.02, 0.007, 0.015]
    got = t_interval(diffs)
    assert got is not None
    want = sps.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert math.isclose(got.low, want.low, rel_tol=1e-9) and math.isclose(got.high, want.high, rel_tol=1e-9)
    assert got.n == 6 and got.excludes_zero
    single = t_interval([0.5])
    assert single is not None and math.isnan(single.low) and not single.excludes_zero


# -- end to end -------------------------------------------------------------------------------
def test_smoke_run_resume_and_report(data_root: Path, tmp_path: Path) -> None:
    out, doc = tmp_path / "smoke.jsonl", tmp_path / "docs" / "EVALUATION.md"
    args = ["run", "--config", str(REPO / "bench/eval/smoke.json"), "--out", str(out)]
    args += ["--data-root", str(data_root), "--work-dir", str(tmp_path / "work"), "--jobs", "1"]
    assert main(args) == 0
    runs = [r for r in read_results(out) if r["type"] == "run"]
    assert [r["key"] for r in runs] == [
        "sst2/sst2/head_only/none/default/s0",
        "sst2/sst2/single_adapter/none/default/s0",
        "sst2/sst2/hard/random/default/s0",
        "sst2/sst2/units/random/default/s0",
    ]
    units = runs[3]  # its sections: unit ids and gains, the head, the framing
    assert units["bytes"]["total"] == sum(
        units["bytes"][k] for k in ("selection", "head", "header", "extras")
    )
    assert units["bytes"]["selection"] > 0 and units["bytes"]["extras"] == 2 * 6  # an fp16 gain per layer
    hard = runs[2]
    assert hard["bytes"]["total"] == sum(hard["bytes"][k] for k in ("selection", "head", "header", "extras"))
    assert hard["n_dev"] == 8 and hard["bank_id"] and 0 < len(hard["loss_curve"]) <= 50
    assert main(args) == 0  # resume: nothing left to run
    assert len([r for r in read_results(out) if r["type"] == "run"]) == 4
    assert main(["report", "--results", str(out), "--out", str(doc)]) == 0
    text = doc.read_text()
    for r in runs:
        assert f"{r['accuracy'] * 100:.2f} ± 0.00 [1]" in text
    diff = (hard["accuracy"] - runs[0]["accuracy"]) * 100
    assert re.search(rf"\| SST-2 \| {diff:+.2f} \(n=1", text)
    assert f"largest {hard['bytes']['total']:,} B" in text and "do not edit by hand" in text
    assert (tmp_path / "docs" / "img" / "eval" / "main.png").stat().st_size > 0
    assert (tmp_path / "docs" / "img" / "eval" / "curves.png").is_file()


def test_deadline_uses_the_same_task_and_method(tmp_path: Path) -> None:
    from bench.eval.plan import RunSpec
    from bench.eval.runner import Runner

    runner = Runner(parse_config(_config()), tmp_path / "r.jsonl", data_root=".", deadline_seconds=30)
    runner.seconds[("sst2", "hard")] = [40.0]
    runner.seconds[("sst2", "head_only")] = [1.0]
    spec = RunSpec("sst2", "sst2", "hard", "random", "default", 0)
    assert not runner._fits(spec)  # 40 s of a run will not end in 30 s
    assert runner._fits(RunSpec("sst2", "sst2", "head_only", "none", "default", 0))
    assert not runner._fits(RunSpec("sst2", "sst2", "soft", "random", "default", 0))  # slowest of the task
    assert runner._fits(RunSpec("rte", "rte", "hard", "random", "default", 0))  # nothing known yet


def test_only_names_must_exist(data_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"no task named \['sts'\]"):
        build_plan(parse_config(_config()), TaskData(data_root), only_tasks=["sts"])
