"""The monitoring that ships in deploy/: Prometheus alert rules and the Grafana dashboard.

The rules pass ``promtool check rules``; a real Prometheus (Debian's ``prometheus`` package,
installed by .ci/run) scrapes a real ``xpeft serve`` on loopback under a little traffic (two
profiles uploaded, mixed predicts, a training job queued and cancelled), loads the rules, and
answers every dashboard query and every alert's expression (without its threshold) with data.
The job store's counts of ended jobs, which the job-failure alert reads, are checked on both
backends. Skipped only where Prometheus is missing (a failure under CI).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from xpeft.server.jobs.records_redis import RedisJobStore
from xpeft.server.jobs.records_sqlite import SQLiteJobStore

ROOT = Path(__file__).resolve().parents[3]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "xpeft.json"
ADMIN = "monitoring-admin-token-5b1c7e"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
# an alert is `<expression> <comparison> <number>`: the expression alone must select series
THRESHOLD = re.compile(r"^(?P<inner>.+?)\s*(?:==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+(?:e[-+]?[0-9]+)?\s*$", re.S)
# what Grafana puts in place of the dashboard's variables: every replica, a 5 minute window
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must check the monitoring files: install Debian's prometheus (.ci/run)")
        pytest.skip(f"{name} is not installed (.ci/run installs Debian's prometheus package)")
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, Grafana's variables filled in."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            found.append((panel["title"], expr))
    return found


def test_promtool_accepts_the_rules_and_the_compose_scrape_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout
    # the compose config names the rules where compose mounts them: check it with them beside it
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(
        ALERTS.read_text().replace("rate(xpeft_store_errors_total[5m])", "rate(xpeft_store_errors_total)")
    )
    done = subprocess.run(
        [promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0


def test_every_alert_has_a_threshold_and_says_what_to_do() -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "XpeftDown",
        "XpeftNotReady",
        "XpeftOverloaded",
        "XpeftStoreErrors",
        "XpeftInvalidationLag",
        "XpeftPredictLatencyHigh",
        "XpeftTrainJobsFailing",
    } <= names
    deployment_doc = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    for rule in rules:
        assert THRESHOLD.match(rule["expr"].strip()), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f"`{rule['alert']}`" in deployment_doc, f"docs/DEPLOYMENT.md does not explain {rule['alert']}"
    for title, _ in dashboard_queries():
        assert f"**{title}**" in deployment_doc, f"docs/DEPLOYMENT.md does not explain the panel {title!r}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``prometheus(target)``: a real Prometheus on loopback scraping ``target`` every second as
    job ``xpeft``, with the repository's alert rules evaluated every second; its URL."""
    binary = tool("prometheus")
    procs: list[subprocess.Popen] = []

    def start(target: str) -> str:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "xpeft", "static_configs": [{"targets": [target]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30, "Prometheus ready")
        wait_for(lambda: query(url, 'up{job="xpeft"} == 1'), 30, "Prometheus scraping the server")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def query(url: str, promql: str) -> list[dict]:
    """The instant vector Prometheus answers for ``promql`` (an error fails the test)."""
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    body = answer.json()
    assert answer.status_code == 200 and body["status"] == "success", (promql, body)
    assert body["data"]["resultType"] == "vector", promql
    return body["data"]["result"]


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.25)


def test_prometheus_answers_every_dashboard_query_and_alert_from_a_real_server(
    serve, prometheus, tmp_path: Path, profile_bytes, separable
) -> None:
    server = serve(
        "monitored",
        {
            "XPEFT_SQLITE_PATH": str(tmp_path / "profiles.sqlite3"),
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_EMBEDDED_TRAINER": "false",  # the job stays queued: cancelled below, no training
            "XPEFT_MAX_WAIT_MS": "20",
        },
    )
    url = prometheus(f"127.0.0.1:{server.port}")
    texts = ["the film was wonderful", "a dreadful meal", "this book is lovely"]
    predict = '{route="/profiles/{profile_id}/predict"}'
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        for n in (1, 2):
            put = client.put(f"/profiles/mon-{n}", content=profile_bytes(100 + n, labels=["pos", "neg"]))
            assert put.status_code in (200, 201), put.text
            assert client.post(f"/profiles/mon-{n}/predict", json={"inputs": texts}).status_code == 200
        # Prometheus takes a series' first sample as its start: rates need traffic after it
        wait_for(
            lambda: query(url, f"xpeft_http_request_seconds_count{predict} >= 2"), 30, "the first scrape"
        )
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as other:
            for _ in range(2):  # two profiles at once: mixed batches
                for n, c in ((1, client), (2, other)):
                    assert c.post(f"/profiles/mon-{n}/predict", json={"inputs": texts}).status_code == 200
        examples = [{"text": t, "label": y} for t, y in zip(separable.inputs, separable.labels, strict=True)]
        job = client.post("/profiles/mon-3/train", json={"examples": examples, "epochs": 1})
        assert job.status_code == 202, job.text
        assert client.delete(f"/jobs/{job.json()['id']}").status_code in (200, 202)

    # everything above has reached Prometheus through at least one scrape
    wanted = {
        "sum(xpeft_batch_rows_sum)": 6 * len(texts),  # every text predicted
        'sum(xpeft_train_jobs_total{event="queued"})': 1,
        'sum(xpeft_train_jobs_ended_total{state="cancelled"})': 1,  # counted by the job store
        "sum(xpeft_invalidation_lag_seconds_count)": 2,  # both uploads, through the change feed
    }
    seen: dict[str, float] = {}

    def scraped() -> bool:
        for promql in wanted:
            result = query(url, promql)
            seen[promql] = float(result[0]["value"][1]) if result else math.nan
        return seen == wanted

    try:
        wait_for(scraped, 30, "the traffic's counters in Prometheus")
    except AssertionError:
        raise AssertionError(f"Prometheus shows {seen}, expected {wanted}") from None
    time.sleep(1.5)  # one more scrape, so every rate has two samples since the traffic

    for title, expr in dashboard_queries():
        result = query(url, expr)
        assert result, f"dashboard panel {title!r} has no data: {expr}"
        values = [float(sample["value"][1]) for sample in result]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: only NaN for {expr}"

    rules = alert_rules()
    for rule in rules:
        inner = THRESHOLD.match(rule["expr"].strip())
        assert inner is not None
        assert query(url, inner["inner"]), f"alert {rule['alert']} selects no series: {inner['inner']}"

    def loaded() -> list[dict]:
        groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        evaluated = [r for g in groups for r in g["rules"] if r.get("lastEvaluation", "").startswith("20")]
        return evaluated if len(evaluated) == len(rules) else []

    evaluated = wait_for(loaded, 10, "every rule evaluated")
    assert isinstance(evaluated, list)
    for rule in evaluated:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    # a healthy server: not ready, store errors and failed jobs are not even pending
    states = {rule["name"]: rule["state"] for rule in evaluated}
    for name in (
        "XpeftDown",
        "XpeftNotReady",
        "XpeftStoreErrors",
        "XpeftTrainJobsFailing",
        "XpeftOverloaded",
    ):
        assert states[name] == "inactive", states


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_job_stores_count_each_ended_job_once(backend: str, tmp_path: Path, redis_url: str) -> None:
    """The counts behind ``xpeft_train_jobs_ended_total``: one per job that ends, by its state,
    whoever ends it; a refused transition (a second finish, an ended job cancelled) counts nothing."""
    prefix = f"xpeft-mon-{uuid.uuid4().hex[:10]}"
    jobs = (
        SQLiteJobStore(tmp_path / "jobs.sqlite3", ttl_s=3600)
        if backend == "sqlite"
        else RedisJobStore(redis_url, prefix, ttl_s=3600)
    )
    try:
        assert jobs.ended_counts() == {}
        ids = [f"{n:020x}" for n in range(4)]
        for job_id in ids:
            jobs.create({"id": job_id, "profile_id": "p", "state": "queued"}, b"[]")
        for job_id in ids[:3]:
            assert jobs.claim(job_id, "w1") is not None
        assert jobs.finish(ids[0], "w1", "succeeded")
        assert jobs.finish(ids[1], "w1", "failed", error={"code": "internal_error", "message": "x"})
        assert not jobs.finish(ids[1], "w1", "succeeded")  # ended already: no second count
        assert jobs.expire(ids[2], lease_s=-1.0) is not None  # the lease ran out: worker_lost
        assert jobs.cancel(ids[3]) is not None
        assert jobs.cancel(ids[3]) is not None  # cancelled already: nothing changes
        assert jobs.ended_counts() == {"succeeded": 1, "failed": 2, "cancelled": 1}
    finally:
        jobs.close()
        if backend == "redis":
            import redis

            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"{{{prefix}}}*"))
            if keys:
                client.delete(*keys)
            client.close()
