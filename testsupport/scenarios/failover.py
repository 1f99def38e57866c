"""A master of a real local Redis Cluster SIGKILLed under PUT + predict load, two replicas serving.

The cluster: 3 masters with a replica each, all ``redis-server`` processes on loopback
(:class:`testsupport.cluster.LocalCluster`, node timeout 1 s). Two ``xpeft serve`` processes in
cluster mode, both given the *same* node's URL; that node is the master killed. Before the kill,
``cached`` profiles are uploaded on replica a and predicted on replica b (so b caches them). Then
one thread uploads new profiles to a (each retried after a 503 until acknowledged), one predicts
the cached profiles on b (those whose slots the victim owns, where there are any), and the master dies. Counted: predictions that failed, the seconds from
the kill until a write to the dead master's slots is acknowledged again, the 503s (each must
carry ``Retry-After``), and acknowledged writes that the store does not hold afterwards (lost).
Used by the failover test (which asserts) and by ``python -m bench.scale.run --cluster`` (which
records the figures).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from testsupport.cluster import LocalCluster
from testsupport.processes import ServerProcess

ADMIN = "admin-token-for-the-failover-run"


def _owner_ports(nodes: LocalCluster, prefix: str) -> Callable[[str], int]:
    """profile id -> port of the master serving it now."""
    from xpeft.server.stores.redis_cluster_store import RedisClusterStore

    probe = RedisClusterStore("redis://unused", prefix)
    owners = {tag: nodes.owner(tag) for tag in probe.tags}
    return lambda profile_id: owners[probe.tag(profile_id)]


def run_failover(
    bank_path: Path,
    jobs_redis_url: str,
    work: Path,
    payloads: list[bytes],
    cached: int = 12,
    after_s: float = 10.0,
    deadline_s: float = 40.0,
) -> dict:
    """The figures of one kill; see the module docstring. ``after_s``: load continues this long
    after the first write acknowledged by the promoted replica."""
    nodes = LocalCluster(replicas=1, node_timeout_ms=1000)
    servers: list[ServerProcess] = []
    try:
        victim = nodes.masters()[0]
        prefix = f"failover-{int(time.time())}"
        env = {
            "XPEFT_REDIS_URL": nodes.url(victim),
            "XPEFT_REDIS_CLUSTER": "true",
            "XPEFT_JOBS_REDIS_URL": jobs_redis_url,
            "XPEFT_REDIS_PREFIX": prefix,
            "XPEFT_ADMIN_TOKEN": ADMIN,
            "XPEFT_STORE_TIMEOUT_S": "1",
            "XPEFT_MAX_WAIT_MS": "5",
            "XPEFT_ACCESS_LOG": "false",
        }
        servers = [ServerProcess(n, dict(env), bank_path, work / f"{n}.log") for n in ("a", "b")]
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        owner = _owner_ports(nodes, prefix)
        headers = {"Authorization": f"Bearer {ADMIN}"}
        a = httpx.Client(base_url=servers[0].url, headers=headers, timeout=10, trust_env=False)
        b = httpx.Client(base_url=servers[1].url, headers=headers, timeout=10, trust_env=False)
        ready = b.get("/readyz").json()["detail"]
        warm = [f"cached-{i}" for i in range(cached)]
        for i, pid in enumerate(warm):
            assert a.put(f"/profiles/{pid}", content=payloads[i % len(payloads)]).status_code == 201
            assert b.post(f"/profiles/{pid}/predict", json={"inputs": ["warm up"]}).status_code == 200
        on_victim = sum(owner(p) == victim for p in warm)
        # the cached profiles an outage could break are the victim's: the predictor asks for those,
        # so every prediction made while its slots have no master counts
        targets = [p for p in warm if owner(p) == victim] or warm

        stop = threading.Event()
        killed_at: list[float] = []
        acked: dict[str, int] = {}
        back_at: list[float] = []  # a write to the dead master's slots acknowledged after the kill
        refusals = {"503": 0, "503_without_retry_after": 0, "other": 0}
        predicts = {"ok": 0, "failed": 0, "during_outage_ok": 0}

        def writer() -> None:
            i = 0
            while not stop.is_set():
                pid, data = f"w-{i:05d}", payloads[i % len(payloads)]
                while not stop.is_set():
                    try:
                        answer = a.put(f"/profiles/{pid}", content=data)
                    except httpx.HTTPError:
                        refusals["other"] += 1
                        continue
                    if answer.status_code in (200, 201):
                        acked[pid] = answer.json()["version"]
                        if killed_at and not back_at and owner(pid) == victim:
                            back_at.append(time.monotonic())
                        break
                    if answer.status_code == 503:
                        refusals["503"] += 1
                        refusals["503_without_retry_after"] += "retry-after" not in answer.headers
                        time.sleep(0.1)  # Retry-After says 1 s; a shorter pause measures the window finer
                    else:
                        refusals["other"] += 1
                        time.sleep(0.1)
                i += 1

        def predictor() -> None:
            k = 0
            while not stop.is_set():
                pid = targets[k % len(targets)]
                k += 1
                try:
                    ok = b.post(f"/profiles/{pid}/predict", json={"inputs": ["is it still up?"]}).status_code
                except httpx.HTTPError:
                    ok = 0
                predicts["ok" if ok == 200 else "failed"] += 1
                if ok == 200 and killed_at and not back_at and owner(pid) == victim:
                    predicts["during_outage_ok"] += 1

        threads = [threading.Thread(target=writer), threading.Thread(target=predictor)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2.0)
            written_before = len(acked)
            nodes.kill(victim)
            killed_at.append(time.monotonic())
            end = killed_at[0] + deadline_s
            while time.monotonic() < end and not back_at:
                time.sleep(0.1)
            if back_at:
                time.sleep(min(after_s, max(0.0, end - time.monotonic())))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        promoted = nodes.masters()
        lost = []
        for pid, version in acked.items():
            got = b.get(f"/profiles/{pid}")
            if got.status_code != 200 or got.json()["version"] != version:
                lost.append(pid)
        # a replica still follows the store after the failover: a new upload on a serves on b
        fresh = a.put(f"/profiles/{warm[0]}", content=payloads[-1]).json()["version"]
        seen_fresh = None
        for _ in range(50):
            seen_fresh = b.post(f"/profiles/{warm[0]}/predict", json={"inputs": ["new?"]}).json()["version"]
            if seen_fresh == fresh:
                break
            time.sleep(0.1)
        a.close()
        b.close()
        return {
            "masters": 3,
            "replicas_per_master": 1,
            "node_timeout_ms": 1000,
            "readyz_before": ready,
            "cached_profiles": cached,
            "cached_on_killed_master": on_victim,
            "writes_acked": len(acked),
            "writes_acked_before_kill": written_before,
            "writes_lost": len(lost),
            "writes_unavailable_s": (back_at[0] - killed_at[0]) if back_at else None,
            "refusals": refusals,
            "predicts": predicts,
            "killed_master_replaced": victim not in promoted and len(promoted) == 3,
            "new_version_served_after_failover": seen_fresh == fresh,
        }
    finally:
        for server in servers:
            server.stop()
        nodes.close()
