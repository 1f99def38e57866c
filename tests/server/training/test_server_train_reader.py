"""One reader for training examples: files (``xpeft train --data``, and the training route's file
bodies) and JSON bodies refuse the same values with the row they came from, and the route checks
the abstention rule's hold-out arithmetic before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from xpeft.adapters.errors import XPeftError
from xpeft.training.abstain_fit import check_training_data
from xpeft.training.data import Dataset, load_dataset
from xpeft.training.train_config import TrainConfig

ADMIN = "reader-admin-token-6d0b2e"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

JSONL_BAD = {
    "null label": ({"sentence": "fine", "label": None}, "the label is missing (or null)"),
    "missing label": ({"sentence": "fine"}, "the label is missing (or null)"),
    "boolean label": ({"sentence": "fine", "label": True}, "the label is a boolean"),
    "object label": ({"sentence": "fine", "label": {"a": 1}}, "the label is an object"),
    "list label": ({"sentence": "fine", "label": ["pos"]}, "the label is a list"),
    "float label": ({"sentence": "fine", "label": 1.5}, "not an integer"),
    "null text": ({"sentence": None, "label": "pos"}, "the text is missing (or null)"),
    "number text": ({"sentence": 7, "label": "pos"}, "the text is int"),
    "object text": ({"sentence": {"t": "x"}, "label": "pos"}, "the text is an object"),
}


@pytest.mark.parametrize("case", sorted(JSONL_BAD))
def test_a_jsonl_file_refuses_values_that_are_not_text_with_their_row(case: str, tmp_path: Path) -> None:
    bad, message = JSONL_BAD[case]
    rows = [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": 3}, bad]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(XPeftError) as refused:
        load_dataset(path)
    assert refused.value.code == "bad_data"
    assert "row 3" in refused.value.message and message in refused.value.message


def test_a_csv_row_without_its_label_is_refused_not_read_as_class_none(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\ngood,pos\nbad,neg\nno label here\n")
    with pytest.raises(XPeftError, match="row 3: the label is missing"):
        load_dataset(path)
    path.write_text("sentence,label\ngood,pos\nbad,7\n")
    assert load_dataset(path).labels == ["pos", "7"]  # an integer label stays a label


@pytest.mark.parametrize(
    ("options", "examples", "message"),
    [
        ({"min_confidence": 0.5}, 12, "at least 10 held-out examples"),
        ({"fallback_label": "neg"}, 12, "at least 10 held-out examples"),
        ({"oos_label": "oos"}, 12, "at least 10 held-out examples"),
        ({"oos_label": "neg"}, 400, "at least 2 labels"),  # the OOS rows leave one class
    ],
)
def test_abstention_options_are_checked_with_the_trainers_own_arithmetic(options, examples, message) -> None:
    labels = ["pos", "neg", "oos"] if options.get("oos_label") == "oos" else ["pos", "neg"]
    data = Dataset([f"text {i}" for i in range(examples)], [labels[i % len(labels)] for i in range(examples)])
    with pytest.raises(XPeftError, match=message):
        check_training_data(data, TrainConfig(**options))
    check_training_data(data, TrainConfig())  # without the options: no rule asked for, it trains


@pytest.fixture(scope="module")
def url(serve, tmp_path_factory: pytest.TempPathFactory) -> str:
    sqlite_path = tmp_path_factory.mktemp("reader") / "s.sqlite3"
    env = {
        "XPEFT_ADMIN_TOKEN": ADMIN,
        "XPEFT_SQLITE_PATH": str(sqlite_path),
        "XPEFT_EMBEDDED_TRAINER": "false",
    }
    return serve("reader", env).url


def _jobs(url: str) -> list[str]:
    return [j["id"] for j in httpx.get(f"{url}/jobs", headers=AUTH).json()["jobs"]]


def test_the_route_refuses_the_same_values_from_files_and_json_with_nothing_queued(url: str) -> None:
    before = _jobs(url)
    good = [{"sentence": f"text {i}", "label": ["pos", "neg"][i % 2]} for i in range(8)]
    for bad, _ in JSONL_BAD.values():
        body = "\n".join(json.dumps(r) for r in [*good, bad]).encode()
        answer = httpx.post(
            f"{url}/profiles/r-file/train",
            content=body,
            headers={**AUTH, "Content-Type": "application/jsonl"},
        )
        assert answer.status_code == 422 and answer.json()["error"] == "bad_data", answer.text
        assert "row 9" in answer.json()["message"] and "/tmp" not in answer.json()["message"]
        as_json = {"text": bad.get("sentence"), "label": bad.get("label")}
        examples = [{"text": r["sentence"], "label": r["label"]} for r in good] + [as_json]
        answer = httpx.post(f"{url}/profiles/r-json/train", json={"examples": examples}, headers=AUTH)
        assert answer.status_code == 422 and answer.json()["error"] == "invalid_request", answer.text
        assert "example 8" in answer.json()["message"]
    csv_body = b"sentence,label\na,pos\nb,neg\nc\n"
    answer = httpx.post(
        f"{url}/profiles/r-csv/train", content=csv_body, headers={**AUTH, "Content-Type": "text/csv"}
    )
    assert answer.status_code == 422 and "row 3: the label is missing" in answer.json()["message"]
    assert _jobs(url) == before  # nothing queued, nothing stored
    assert httpx.get(f"{url}/profiles/r-csv", headers=AUTH).status_code == 404


def test_the_route_refuses_abstention_options_the_trainer_would_fail_on(url: str) -> None:
    before = _jobs(url)
    small = [{"text": f"text {i}", "label": ["pos", "neg"][i % 2]} for i in range(12)]
    for options in ({"min_confidence": 0.5}, {"fallback_label": "neg"}):
        answer = httpx.post(f"{url}/profiles/r-abs/train", json={"examples": small, **options}, headers=AUTH)
        assert answer.status_code == 422 and answer.json()["error"] == "bad_data", answer.text
        assert "held-out examples" in answer.json()["message"]
    one_class = [{"text": f"text {i}", "label": ["pos", "oos"][i % 2]} for i in range(400)]
    answer = httpx.post(
        f"{url}/profiles/r-abs/train", json={"examples": one_class, "oos_label": "oos"}, headers=AUTH
    )
    assert answer.status_code == 422 and "at least 2" in answer.json()["message"], answer.text
    assert _jobs(url) == before
    fine = httpx.post(f"{url}/profiles/r-abs/train", json={"examples": small}, headers=AUTH)
    assert fine.status_code == 202  # the same data without the options is accepted
