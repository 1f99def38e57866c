"""A master of a real local Redis Cluster (3 masters, 3 replicas) is SIGKILLed under PUT + predict
load (testsupport/scenarios/failover.py): its replica is promoted, both replicas follow without a restart
or a URL change, cached profiles keep answering, writes in the window get 503 with Retry-After
and succeed when retried, and no acknowledged write is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testsupport.scenarios.failover import run_failover


def test_a_killed_master_is_survived(bank_path: Path, redis_url: str, profile_bytes, tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are not installed (CI installs them)")
    figures = run_failover(bank_path, redis_url, tmp_path, [profile_bytes(i) for i in range(4)], after_s=3.0)
    assert figures["readyz_before"]["store"] == "redis-cluster"
    assert figures["readyz_before"]["store_state"]["cluster_state"] == "ok"
    assert figures["killed_master_replaced"]
    assert figures["predicts"]["failed"] == 0 and figures["predicts"]["during_outage_ok"] > 0
    assert figures["cached_on_killed_master"] > 0
    assert figures["writes_unavailable_s"] is not None and figures["writes_unavailable_s"] <= 10
    assert figures["refusals"]["503"] > 0 and figures["refusals"]["503_without_retry_after"] == 0
    assert figures["refusals"]["other"] == 0
    assert figures["writes_acked"] > figures["writes_acked_before_kill"]
    assert figures["writes_lost"] == 0
    assert figures["new_version_served_after_failover"]
