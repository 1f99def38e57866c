"""The quality benchmark's TweetEval tasks (hate, emoji, stance) and ``--only-methods``, on tiny
files the tests write in the shared data's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.eval.__main__ import main
from bench.eval.config import ConfigError, load_config, parse_config
from bench.eval.plan import build_plan
from bench.eval.results import read_results
from bench.eval.tasks import TaskData

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("abortion", "atheism", "climate")
TWEET_TASKS = ["tweeteval_hate", "tweeteval_emoji", "tweeteval_stance"]


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [("sentence", "label"), *rows]) + "\n")


def _split(folder: Path, labels: list[str], sizes: dict[str, int], tag: str = "") -> None:
    """Each row names its split, so a test can tell which file a profile read."""
    for split, n in sizes.items():
        _write(
            folder / f"{split}.tsv",
            [(f"{split} {tag} tweet {i} @user", labels[i % len(labels)]) for i in range(n)],
        )


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _split(root / "tweeteval_hate", ["hateful", "not_hateful"], {"train": 40, "dev": 6, "test": 12})
    emoji = [f"emoji_{i}" for i in range(20)]
    _split(root / "tweeteval_emoji", emoji, {"train": 60, "dev": 20, "test": 30})
    for n, target in enumerate(TARGETS):
        sizes = {"train": 9 + n, "dev": 3, "test": 5 + n}
        _split(root / "tweeteval_stance" / target, ["none", "against", "favor"], sizes, target)
    (root / "tweeteval_stance" / "brexit").mkdir()  # no files: not a target
    return root


def _tasks(*tasks: dict) -> dict:
    return {"name": "t", "methods": ["head_only", "single_adapter", "hard", "units"], "tasks": list(tasks)}


def test_file_tasks_train_on_train_and_score_on_test(root: Path) -> None:
    config = parse_config(_tasks({"kind": "tweeteval_hate"}, {"kind": "tweeteval_emoji", "train_size": 25}))
    data = TaskData(root)
    hate, emoji = config.tasks
    assert data.profile_names(hate) == ["tweeteval_hate"] and data.profile_names(emoji) == ["tweeteval_emoji"]
    (p,) = data.profiles(hate)
    assert (p.task, p.name, len(p.train), len(p.dev)) == ("tweeteval_hate", "tweeteval_hate", 40, 12)
    assert all(x.startswith("train ") for x in p.train.inputs)
    assert all(x.startswith("test ") for x in p.dev.inputs)  # test.tsv, not dev.tsv
    (e,) = data.profiles(emoji)
    assert len(e.train) == 25 and len(e.dev) == 30 and len(set(e.dev.labels)) == 20


def test_stance_is_one_profile_per_target(root: Path) -> None:
    spec = parse_config(_tasks({"kind": "tweeteval_stance", "epochs": 5, "batch_size": 16})).tasks[0]
    data = TaskData(root)
    assert spec.name == "tweeteval_stance" and data.profile_names(spec) == list(TARGETS)
    profiles = data.profiles(spec)
    for n, (p, target) in enumerate(zip(profiles, TARGETS, strict=True)):
        assert (p.task, p.name) == ("tweeteval_stance", target)
        assert len(p.train) == 9 + n and len(p.dev) == 5 + n  # every train row; the whole test split
        assert all(x.startswith(f"train {target} ") for x in p.train.inputs)
        assert all(x.startswith(f"test {target} ") for x in p.dev.inputs)
        assert set(p.train.labels) == {"none", "against", "favor"}
    only = parse_config(_tasks({"kind": "tweeteval_stance", "profiles": ["climate"]})).tasks[0]
    assert [p.name for p in data.profiles(only)] == ["climate"]


@pytest.mark.parametrize(
    ("task", "remove", "message"),
    [
        (
            {"kind": "tweeteval_stance", "profiles": ["brexit", "climate"]},
            None,
            r"tweeteval_stance: no TweetEval stance target\(s\) \['brexit'\].*there are \['abortion', 'atheism', 'climate'\]",
        ),
        (
            {"kind": "tweeteval_stance"},
            "tweeteval_stance",
            r"no TweetEval stance target folders at .*--data-root",
        ),
        (
            {"kind": "tweeteval_hate"},
            "tweeteval_hate",
            r"tweeteval_hate: no tweeteval_hate/train\.tsv, tweeteval_hate/test\.tsv under .*--data-root",
        ),
        ({"kind": "tweeteval_emoji"}, "tweeteval_emoji/test.tsv", r"no tweeteval_emoji/test\.tsv under"),
    ],
)
def test_missing_targets_and_folders_fail_clearly(
    root: Path, task: dict, remove: str | None, message: str
) -> None:
    if remove:
        path = root / remove
        if path.is_dir():
            for f in sorted(path.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            path.rmdir()
        else:
            path.unlink()
    spec = parse_config(_tasks(task)).tasks[0]
    with pytest.raises(ConfigError, match=message):
        TaskData(root).profile_names(spec)
    with pytest.raises(ConfigError, match=message):
        build_plan(parse_config(_tasks(task)), TaskData(root))


def test_cpu_config_plans_the_tweeteval_runs(root: Path) -> None:
    """The documented command's plan: the config's seeds x (hate + emoji + one profile per target)
    x 3 methods, and the other tasks' data need not be there."""
    config = load_config(REPO / "bench" / "eval" / "cpu.json")
    tasks = {t.name: t for t in config.tasks}
    assert (tasks["tweeteval_hate"].train_size, tasks["tweeteval_emoji"].train_size) == (1500, 2000)
    assert tasks["tweeteval_stance"].train_size is None and tasks["tweeteval_stance"].epochs == 5
    methods = ["head_only", "single_adapter", "units"]
    plan = build_plan(config, TaskData(root), ["default"], TWEET_TASKS, methods)
    assert len(plan) == len(config.seeds) * (1 + 1 + len(TARGETS)) * 3
    assert {s.method for s in plan} == set(methods) and {s.bank for s in plan} == {"none", "random"}
    assert {s.profile for s in plan if s.task == "tweeteval_stance"} == set(TARGETS)
    assert plan[0].key == "tweeteval_hate/tweeteval_hate/head_only/none/default/s0"
    with pytest.raises(ConfigError, match=r"no method named \['lora'\]"):
        build_plan(config, TaskData(root), ["default"], TWEET_TASKS, ["units", "lora"])


def test_only_methods_on_the_command_line(root: Path, tmp_path: Path) -> None:
    config = {
        **_tasks({"kind": "tweeteval_hate", "max_length": 16, "epochs": 1, "batch_size": 8}),
        "device": "cpu",
        "seeds": [0],
        "random_bank": {"num_adapters": 4},
    }
    path, out = tmp_path / "c.json", tmp_path / "r.jsonl"
    path.write_text(json.dumps(config))
    args = ["run", "--config", str(path), "--out", str(out), "--data-root", str(root)]
    args += ["--work-dir", str(tmp_path / "work"), "--no-progress", "--only-methods", "head_only"]
    assert main(args) == 0
    rows = read_results(out)
    assert [r["method"] for r in rows if r["type"] == "run"] == ["head_only"]
    start = next(r for r in rows if r["type"] == "session")
    assert start["planned"] == 1 and "--only-methods" in start["argv"]
    assert main([*args[:-1], "hard,lora"]) == 2  # an unknown method is refused before any run
