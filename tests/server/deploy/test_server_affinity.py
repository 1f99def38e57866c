"""Profile affinity with the repository's nginx config (real nginx) in front of two real replicas.

Predictions of one profile always reach the same replica (a consistent hash of the id from the
path), and when that replica is killed (SIGKILL) its profiles are answered by the other one,
nothing lost. With stand-in replicas: the max_conns bound spills a hot profile's overflow to
the other replica instead of piling it onto one, and training requests are routed by id but
never resent. The load benchmark is bench/affinity (docs/DEPLOYMENT.md).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from testsupport.nginx import CONF, render, shares
from testsupport.processes import ServerProcess, running

IDS = [f"aff-{i:02d}" for i in range(24)]


def test_every_upstream_lists_the_same_replicas_and_predictions_hash_on_the_id() -> None:
    conf = CONF.read_text()
    blocks = dict(re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, re.S))
    assert set(blocks) == {"xpeft", "xpeft_by_profile", "xpeft_train"}
    servers = {name: re.findall(r"^\s*server\s+([\w.-]+:\d+)", body, re.M) for name, body in blocks.items()}
    assert len({tuple(s) for s in servers.values()}) == 1, servers  # a replica added everywhere
    assert "hash $profile_id consistent;" in blocks["xpeft_by_profile"]
    assert "hash $profile_id consistent;" in blocks["xpeft_train"]
    assert "least_conn;" in blocks["xpeft"]
    # the bound applies to every replica of the prediction ring, and each ring shares its state
    assert blocks["xpeft_by_profile"].count("max_conns=") == len(servers["xpeft"])
    assert all("zone " in body for body in blocks.values())


def test_the_benchmark_renders_the_same_file_with_only_the_balancing_changed(tmp_path: Path) -> None:
    hashed = render(tmp_path, [7001, 7002], 7000).read_text()
    least = render(tmp_path, [7001, 7002], 7000, balance="least_conn").read_text()
    assert "hash $profile_id consistent;" in hashed and "hash $profile_id" not in least
    assert hashed.replace("hash $profile_id consistent;", "least_conn;") == least
    assert "server xpeft-" not in hashed and "server 127.0.0.1:7002" in hashed
    with pytest.raises(ValueError):
        render(tmp_path, [7001], 7000)  # the file names two replicas


@pytest.fixture
def replicas(
    nginx,  # first: where nginx is missing the test skips before any server starts
    redis_url: str,
    redis_prefix: str,
    bank_path: Path,
    tmp_path: Path,
    admin_headers: dict[str, str],
) -> Iterator[list[ServerProcess]]:
    env = {
        "XPEFT_REDIS_URL": redis_url,
        "XPEFT_REDIS_PREFIX": f"{redis_prefix}-affinity",
        "XPEFT_ADMIN_TOKEN": admin_headers["Authorization"].removeprefix("Bearer "),
        "XPEFT_MAX_WAIT_MS": "2",
    }
    servers = [ServerProcess(n, dict(env), bank_path, tmp_path / f"{n}.log") for n in ("r1", "r2")]
    with running(*servers):
        yield servers


def test_same_profile_same_replica_and_a_killed_replica_loses_nothing(
    replicas: list[ServerProcess], nginx, profile_bytes, admin_headers
) -> None:
    lb = nginx([r.port for r in replicas])
    with httpx.Client(base_url=lb.url, timeout=30, trust_env=False) as client:
        data = profile_bytes(7)
        for profile_id in IDS:
            assert client.put(f"/profiles/{profile_id}", content=data, headers=admin_headers).status_code in (
                200,
                201,
            )
        for _ in range(3):
            for profile_id in IDS:
                answer = client.post(f"/profiles/{profile_id}/predict", json={"inputs": ["a fine day"]})
                assert answer.status_code == 200, answer.text
    logged = lb.wait_log(1 + 4 * len(IDS))  # nginx's start-up probe, the uploads, the predictions
    predictions = [e for e in logged if e.profile_id in IDS]
    assert len(predictions) == 3 * len(IDS)
    home: dict[str, set[str]] = defaultdict(set)
    for entry in predictions:
        home[entry.profile_id].add(entry.replica or "")
    assert all(len(ports) == 1 for ports in home.values()), home  # one replica per profile
    owners = {next(iter(ports)) for ports in home.values()}
    assert owners == {str(r.port) for r in replicas}, "the ids should be spread over both replicas"

    # SIGKILL one replica: every profile is still answered, the victim's by the survivor.
    victim, survivor = replicas
    assert victim.proc is not None
    victim.proc.kill()
    victim.proc.wait(10)
    victim.proc = None
    victim.log.close()
    seen = len(logged)
    with httpx.Client(base_url=lb.url, timeout=30, trust_env=False) as client:
        for profile_id in IDS:
            answer = client.post(f"/profiles/{profile_id}/predict", json={"inputs": ["still here?"]})
            assert answer.status_code == 200, (profile_id, answer.text)
    after = lb.wait_log(seen + len(IDS))[seen:]
    assert len(after) == len(IDS)
    assert {e.replica for e in after} == {str(survivor.port)}
    assert all(e.status == 200 for e in after)


def test_a_hot_profile_spills_past_the_bound_and_nothing_is_refused(nginx, stand_in) -> None:
    backends = [stand_in(delay_s=0.3), stand_in(delay_s=0.3)]
    lb = nginx([b.server_port for b in backends], max_conns=2)

    def predict(_: int) -> int:
        with httpx.Client(base_url=lb.url, timeout=30, trust_env=False) as client:
            return client.post("/profiles/hot/predict", json={"inputs": ["x"]}).status_code

    with ThreadPoolExecutor(8) as pool:  # 8 at once for one id, bound 2 per replica
        statuses = list(pool.map(predict, range(8)))
    assert statuses == [200] * 8
    split = shares([e for e in lb.wait_log(1 + 8) if e.profile_id == "hot"])
    assert len(split) == 2 and max(split.values()) < 1.0, split  # both replicas served it

    # One at a time, the same id stays on its replica (no bound reached).
    seen = len(lb.wait_log(1 + 8))
    for _ in range(4):
        predict(0)
    assert len({e.replica for e in lb.wait_log(seen + 4)[seen:]}) == 1


def test_training_is_routed_by_id_and_never_resent(nginx, stand_in) -> None:
    live = [stand_in(), stand_in()]
    draining = stand_in(503)  # refuses everything, as a draining replica does
    lb = nginx([b.server_port for b in live])
    with httpx.Client(base_url=lb.url, timeout=30, trust_env=False) as client:
        for profile_id in IDS:
            for _ in range(2):
                assert client.post(f"/profiles/{profile_id}/train", json={}).status_code == 200
    owner: dict[str, set[str | None]] = defaultdict(set)
    for entry in lb.wait_log(1 + 2 * len(IDS)):
        if entry.profile_id in IDS:
            owner[entry.profile_id].add(entry.replica)
    assert all(len(p) == 1 for p in owner.values())  # each id always goes to its owner
    assert len({next(iter(p)) for p in owner.values()}) == 2  # and the ids are spread
    lb.stop()

    lb = nginx([draining.server_port, live[0].server_port])
    with httpx.Client(base_url=lb.url, timeout=30, trust_env=False) as client:
        for profile_id in IDS:
            client.post(f"/profiles/{profile_id}/train", json={})
    trains = [e for e in lb.wait_log(1 + len(IDS)) if e.profile_id in IDS]
    assert len(trains) == len(IDS)
    # A POST that reached a replica is never resent: the refusing replica's answer is final
    # (until nginx marks it failed after max_fails and the ring skips it).
    assert all(len(e.upstreams) == 1 for e in trains)
    assert all((e.status == 503) == (e.replica == str(draining.server_port)) for e in trains)
    assert any(e.status == 503 for e in trains)
