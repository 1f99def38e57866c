"""Training as a service over HTTP: auth, validation, paging, a JSON and a file job end to end,
the keep-if-better option, and the Python client's job object.

Real processes: ``r`` serves from the shared test Redis (a fresh prefix) with an ``xpeft worker``
beside it; ``s`` uses the embedded SQLite store, whose trainer ``xpeft serve`` starts itself.
Jobs train the tests' small separable set (64 examples) for a few steps with the real MiniLM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from testsupport.processes import bearer
from testsupport.workers import WorkerProcess, wait_job
from xpeft.client import Client, ClientError
from xpeft.training.data import Dataset

ADMIN = "train-admin-token-0f3e9a"
API = "train-api-token-7d21c4"
TENANTS = {"train-acme-token-c81b5e": ["acme-"], "train-beta-token-4e90d2": ["beta-"]}
ACME, BETA = list(TENANTS)
AUTH = {"Authorization": f"Bearer {ADMIN}"}
QUICK = {"epochs": 1, "batch_size": 16, "max_length": 16}


@pytest.fixture(scope="module")
def trainers(server_pair, bank_path: Path):
    """``r`` with an ``xpeft worker`` beside it on the same Redis prefix; ``s`` trains in its own process."""
    pair = server_pair(
        "train",
        {"XPEFT_ADMIN_TOKEN": ADMIN},
        redis_env={
            "XPEFT_API_TOKEN": API,
            "XPEFT_PREDICT_TOKENS": json.dumps(TENANTS),
            "XPEFT_TRAIN_HEARTBEAT_S": "0.3",
            "XPEFT_MAX_TRAIN_EXAMPLES": "200",
            "XPEFT_MAX_TEXT_CHARS": "200",
            "XPEFT_MAX_LIST_LIMIT": "50",
        },
    )
    worker = WorkerProcess(
        {**pair.r.env, "XPEFT_TRAIN_NICE": "0"}, bank_path, pair.logs / "worker.log"
    ).start()
    try:
        yield pair
    finally:
        worker.stop()


def examples(data: Dataset) -> list[dict]:
    return [{"text": x, "label": y} for x, y in zip(data.inputs, data.labels, strict=True)]


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["message"], body


def job_count(url: str) -> int:
    return len(httpx.get(f"{url}/jobs", params={"limit": 50}, headers=AUTH, timeout=10).json()["jobs"])


def test_json_job_on_the_embedded_store_trains_stores_and_serves(trainers, separable) -> None:
    url = trainers.s.url
    response = httpx.post(
        f"{url}/profiles/emb-1/train",
        json={"examples": examples(separable), **QUICK},
        headers=AUTH,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    queued = response.json()
    assert response.headers["location"] == f"/jobs/{queued['id']}"
    assert queued["state"] == "queued" and queued["examples"] == 64 and queued["labels"] == ["neg", "pos"]
    done = wait_job(url, queued["id"], AUTH)
    assert done["state"] == "succeeded", done
    progress, result = done["progress"], done["result"]
    assert progress["step"] == progress["total"] == 4  # 58 training examples in batches of 16, one epoch
    assert progress["loss"] > 0 and 0 <= progress["train_accuracy"] <= 1 and progress["eta_s"] == 0
    assert result["stored"] and result["eval_examples"] == 6 and 0 <= result["eval_accuracy"] <= 1
    meta = httpx.get(f"{url}/profiles/emb-1", headers=AUTH).json()
    assert meta["version"] == result["version"] and meta["labels"] == ["neg", "pos"]
    predicted = httpx.post(f"{url}/profiles/emb-1/predict", json={"inputs": ["a superb film"]}, headers=AUTH)
    assert predicted.status_code == 200 and predicted.json()["version"] == result["version"]


def test_file_job_through_the_client_and_a_redis_worker(trainers, separable, tmp_path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text(
        "review\tsentiment\n"
        + "".join(f"{x}\t{y}\n" for x, y in zip(separable.inputs, separable.labels, strict=True))
    )
    seen: list[str] = []
    with Client(trainers.r.url, token=ADMIN) as client:
        job = client.train(
            "file-1", file=path, columns={"text_col": "review", "label_col": "sentiment"}, **QUICK
        )
        assert job.state == "queued"
        done = job.wait(timeout=240, poll_s=0.2, on_progress=lambda rec: seen.append(rec["state"]))
        assert done["state"] == "succeeded" and done["result"]["stored"]
        # 32 rows hold out too few to calibrate a rule: the job's result says so, as xpeft train does
        assert any("no abstention rule" in note for note in done["result"]["notes"]), done["result"]
        assert "running" in seen or "queued" in seen
        assert client.get("file-1")["version"] == done["result"]["version"]
        assert client.job(job.id)["id"] == job.id
        # a second replica would see the same record: it lives in Redis, not in the server
        assert any(j["id"] == job.id for j in client.jobs(limit=50)["jobs"])


def test_auth_is_puts_and_tenants_train_their_own_prefix_only(trainers, separable) -> None:
    url, body = trainers.r.url, {"examples": examples(separable), **QUICK}
    before = job_count(url)
    assert_error(httpx.post(f"{url}/profiles/acme-x/train", json=body), 401, "unauthorized")
    assert_error(httpx.post(f"{url}/profiles/acme-x/train", json=body, headers=bearer(API)), 403, "forbidden")
    assert_error(
        httpx.post(f"{url}/profiles/beta-x/train", json=body, headers=bearer(ACME)), 403, "forbidden"
    )
    assert_error(
        httpx.post(f"{url}/profiles/acme-x/train", json=body, headers=bearer("not-a-token-at-all")),
        403,
        "forbidden",
    )
    assert job_count(url) == before  # nothing queued by a refused request
    ok = httpx.post(f"{url}/profiles/acme-x/train", json=body, headers=bearer(ACME))
    assert ok.status_code == 202, ok.text
    job_id = ok.json()["id"]
    assert httpx.get(f"{url}/jobs/{job_id}", headers=bearer(ACME)).status_code == 200
    assert httpx.get(f"{url}/jobs/{job_id}", headers=bearer(API)).status_code == 200
    assert_error(httpx.get(f"{url}/jobs/{job_id}", headers=bearer(BETA)), 403, "forbidden")
    assert_error(httpx.get(f"{url}/jobs/{job_id}"), 401, "unauthorized")
    assert_error(httpx.delete(f"{url}/jobs/{job_id}", headers=bearer(BETA)), 403, "forbidden")
    assert_error(httpx.delete(f"{url}/jobs/{job_id}", headers=bearer(API)), 403, "forbidden")
    assert_error(httpx.get(f"{url}/jobs", headers=bearer(ACME)), 403, "forbidden")
    assert wait_job(url, job_id, AUTH)["state"] == "succeeded"
    assert_error(httpx.delete(f"{url}/jobs/{job_id}", headers=bearer(ACME)), 409, "job_finished")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"examples": "no"}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ({"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]}, 422, "bad_data"),
        ({"examples": [{"text": "a", "label": "x"}, {"text": "b", "label": True}]}, 422, "invalid_request"),
        ({"examples": [{"text": "a", "label": "x"}, {"text": "", "label": "y"}]}, 422, "bad_data"),
        ({"examples": [{"text": "a" * 201, "label": "x"}, {"text": "b", "label": "y"}]}, 422, "bad_data"),
        ({"examples": [{"text": "a", "label": "x"}] * 201}, 422, "bad_data"),
        ({"examples": [{"text": "a", "label": "x", "extra": 1}]}, 422, "invalid_request"),
        ("EXAMPLES", 422, "bad_argument"),  # method
        ("EXAMPLES+epochs", 422, "bad_argument"),
        ("EXAMPLES+eval", 422, "bad_argument"),
        ("EXAMPLES+keep", 422, "bad_argument"),
        ("EXAMPLES+unknown", 422, "invalid_request"),
        ("EXAMPLES+type", 422, "invalid_request"),
        ("EXAMPLES+min_confidence", 422, "bad_argument"),
        ("EXAMPLES+fallback", 422, "bad_data"),
        ("EXAMPLES+oos_label", 422, "bad_data"),
        ("EXAMPLES+score", 422, "bad_argument"),
    ],
)
def test_invalid_json_requests_are_refused_before_queueing(trainers, separable, body, status, code) -> None:
    good = examples(separable)
    variants = {
        "EXAMPLES": {"examples": good, "method": "lora"},
        "EXAMPLES+epochs": {"examples": good, "epochs": 51},
        "EXAMPLES+eval": {"examples": good, "eval_fraction": 0.9},
        "EXAMPLES+keep": {"examples": good, "eval_fraction": 0, "keep_if_better": True},
        "EXAMPLES+unknown": {"examples": good, "learning_rate": 1},
        "EXAMPLES+type": {"examples": good, "epochs": "3"},
        "EXAMPLES+min_confidence": {"examples": good, "min_confidence": 1.5},
        "EXAMPLES+fallback": {"examples": good, "fallback_label": "maybe"},
        "EXAMPLES+oos_label": {"examples": good, "oos_label": "oos"},
        "EXAMPLES+score": {"examples": good, "abstain_score": "entropy"},
    }
    body = variants.get(body, body) if isinstance(body, str) else body
    url = trainers.r.url
    before = job_count(url)
    assert_error(httpx.post(f"{url}/profiles/bad-1/train", json=body, headers=AUTH), status, code)
    assert job_count(url) == before
    assert httpx.get(f"{url}/profiles/bad-1", headers=AUTH).status_code == 404


def test_invalid_files_and_ids(trainers) -> None:
    url = trainers.r.url
    tsv = {"Content-Type": "text/tab-separated-values", **AUTH}
    assert_error(
        httpx.post(
            f"{url}/profiles/bad-2/train", content=b"x", headers={"Content-Type": "text/plain", **AUTH}
        ),
        415,
        "unsupported_media_type",
    )
    assert_error(
        httpx.post(f"{url}/profiles/bad-2/train", content=b"sentence\tlabel\n", headers=tsv), 422, "bad_data"
    )
    assert_error(
        httpx.post(f"{url}/profiles/bad-2/train", content=b"text\tlabel\na\tb\n", headers=tsv),
        422,
        "bad_data",
    )
    assert_error(
        httpx.post(f"{url}/profiles/bad-2/train", content=b"\xff\xfe\x00", headers=tsv), 422, "bad_data"
    )
    assert_error(
        httpx.post(
            f"{url}/profiles/bad-2/train",
            params={"epochs": "x"},
            content=b"sentence\tlabel\na\tb\nc\td\n",
            headers=tsv,
        ),
        422,
        "invalid_request",
    )
    assert_error(
        httpx.post(f"{url}/profiles/bad-2/train?format=jsonl", content=b"[1]\n[2]\n", headers=AUTH),
        422,
        "bad_data",
    )
    assert_error(httpx.post(f"{url}/profiles/-bad/train", json={}, headers=AUTH), 422, "invalid_profile_id")
    assert_error(httpx.get(f"{url}/jobs/zzz", headers=AUTH), 422, "invalid_job_id")
    assert_error(httpx.get(f"{url}/jobs/{'0' * 20}", headers=AUTH), 404, "job_not_found")
    assert_error(httpx.delete(f"{url}/jobs/{'0' * 20}", headers=AUTH), 404, "job_not_found")
    assert_error(httpx.get(f"{url}/jobs", params={"limit": 51}, headers=AUTH), 422, "invalid_request")


def test_jobs_page_newest_first(trainers, separable) -> None:
    url = trainers.s.url
    ids = []
    for n in range(3):  # queued and cancelled at once: the pages need records, not trained profiles
        response = httpx.post(
            f"{url}/profiles/page-{n}/train", json={"examples": examples(separable), **QUICK}, headers=AUTH
        )
        ids.append(response.json()["id"])
        httpx.delete(f"{url}/jobs/{ids[-1]}", headers=AUTH)
    seen, cursor = [], None
    while True:
        page = httpx.get(
            f"{url}/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=AUTH
        ).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(seen, reverse=True) and len(seen) == len(set(seen))
    assert [i for i in seen if i in ids] == ids[::-1]


def test_keep_if_better_keeps_the_current_version_unless_the_new_one_scores_as_well(
    trainers, separable, frozen_training
) -> None:
    url, body = trainers.r.url, examples(separable)
    first = httpx.post(
        f"{url}/profiles/keep-1/train",
        json={"examples": body, "epochs": 6, "batch_size": 16, "max_length": 16, "eval_fraction": 0.25},
        headers=AUTH,
    )
    first_done = wait_job(url, first.json()["id"], AUTH)
    version = first_done["result"]["version"]
    assert first_done["result"]["eval_accuracy"] >= 0.75, first_done  # six epochs on a separable set
    # nothing learns (every rate 0): the random head scores worse than the trained profile
    frozen = {**frozen_training, "seed": 3}
    second = httpx.post(
        f"{url}/profiles/keep-1/train",
        json={"examples": body, "eval_fraction": 0.25, "keep_if_better": True, **frozen},
        headers=AUTH,
    )
    result = wait_job(url, second.json()["id"], AUTH)["result"]
    assert result["previous_version"] == version
    assert result["stored"] == (result["eval_accuracy"] >= result["previous_accuracy"])
    assert not result["stored"] and result["reason"] == "kept_current" and result["version"] == version
    assert httpx.get(f"{url}/profiles/keep-1", headers=AUTH).json()["version"] == version
    # the first training again: it scores exactly as well, which is enough to be stored; its bytes
    # are the current version's, so the store keeps that version (an unchanged put)
    third = httpx.post(
        f"{url}/profiles/keep-1/train",
        json={
            "examples": body,
            "epochs": 6,
            "batch_size": 16,
            "max_length": 16,
            "eval_fraction": 0.25,
            "keep_if_better": True,
        },
        headers=AUTH,
    )
    result = wait_job(url, third.json()["id"], AUTH)["result"]
    assert result["stored"] and result["eval_accuracy"] == result["previous_accuracy"]
    assert result["unchanged"] and result["version"] == version
    # no current profile: keep-if-better stores whatever it trained
    fresh = httpx.post(
        f"{url}/profiles/keep-2/train",
        json={"examples": body, "eval_fraction": 0.25, "keep_if_better": True, **frozen},
        headers=AUTH,
    )
    result = wait_job(url, fresh.json()["id"], AUTH)["result"]
    assert result["stored"] and "previous_version" not in result and not result["unchanged"]
    assert httpx.get(f"{url}/profiles/keep-2", headers=AUTH).json()["version"] == result["version"]


def train_job_events(url: str) -> dict[str, float]:
    """``xpeft_train_jobs_total`` of one replica, by event."""
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return {
        sample.labels["event"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "xpeft_train_jobs"
        for sample in family.samples
    }


def test_client_wait_raises_on_a_cancelled_job(trainers, separable) -> None:
    before = train_job_events(trainers.s.url)
    with Client(trainers.s.url, token=ADMIN) as client:
        job = client.train("cancel-c", examples=examples(separable), epochs=40, batch_size=2, max_length=16)
        job.cancel()
        after = train_job_events(trainers.s.url)
        assert after["queued"] == before.get("queued", 0) + 1
        assert after["cancelled"] == before.get("cancelled", 0) + 1
        with pytest.raises(ClientError) as info:
            job.wait(timeout=120, poll_s=0.2)
        assert info.value.code == "job_cancelled"
        with pytest.raises(ClientError) as missing:
            client.get("cancel-c")
        assert missing.value.code == "profile_not_found"


def test_cli_train_url_uploads_waits_and_prints_the_served_job(trainers, separable, tmp_path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"sentence": x, "label": y}) + "\n"
            for x, y in zip(separable.inputs, separable.labels, strict=True)
        )
    )
    base = [sys.executable, "-m", "xpeft.cli", "train", "--url", trainers.s.url, "--data", str(path)]
    env = {**os.environ, "XPEFT_ADMIN_TOKEN": ADMIN}
    missing = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith(
        "error: bad_argument: train --url needs --id"
    )
    flags = [
        "--id",
        "cli-1",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--eval-fraction",
        "0.2",
    ]
    done = subprocess.run(base + flags, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "succeeded" and record["options"]["eval_fraction"] == 0.2
    assert record["options"]["epochs"] == 1 and record["options"]["method"] == "units"
    meta = httpx.get(f"{trainers.s.url}/profiles/cli-1", headers=AUTH).json()
    assert meta["version"] == record["result"]["version"]
    refused = subprocess.run(
        [*base, "--id", "cli-2", "--epochs", "0"], capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode == 2 and refused.stderr.startswith(
        "error: bad_argument: epochs must be at least 1"
    )


def test_compose_runs_a_trainer_beside_the_replicas() -> None:
    """docker-compose.yml: one `xpeft worker` from the server image and environment (so the same
    Redis, prefix, bank and secrets), no port, no health check of an HTTP endpoint it does not
    serve, and not among nginx's upstreams."""
    import yaml

    root = Path(__file__).resolve().parents[3]
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    trainer, replica = services["trainer"], services["xpeft-1"]
    assert trainer["command"] == ["xpeft", "worker"]
    assert trainer["build"] == replica["build"] and trainer["image"] == replica["image"]
    assert trainer["environment"] == replica["environment"] and trainer["secrets"] == replica["secrets"]
    assert trainer["expose"] == [] and trainer["healthcheck"] == {"disable": True}
    assert "trainer" not in (root / "docker" / "nginx.conf").read_text()
