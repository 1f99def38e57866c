"""Serving a maximal profile (XPEFT_MAX_LABELS labels) leaves the server's memory within the
documented head bound, and other profiles' predictions as fast as before, within noise.

A real ``xpeft serve`` process on the embedded store; its resident memory is read from
``/proc/<pid>/status``. Before the heads were kept per slot, one 1,000-label prediction grew every
slot's head to 1,000 columns: about 900 MiB more, kept, and slower batches for everyone.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx
import pytest

from testsupport.processes import ServerProcess, running
from xpeft.engine.slots import head_memory_bound
from xpeft.server.settings import Settings

ADMIN = "head-admin-token-6d2e91"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TEXTS = [f"a short review, number {i}, of a film" for i in range(64)]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def predict_seconds(url: str, profile_id: str, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        answer = httpx.post(
            f"{url}/profiles/{profile_id}/predict", json={"inputs": TEXTS}, headers=AUTH, timeout=120
        )
        assert answer.status_code == 200, answer.text
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_maximal_profile_stays_within_the_head_bound(bank, bank_path, profile_bytes, tmp_path) -> None:
    server = ServerProcess(
        "heads",
        {"XPEFT_SQLITE_PATH": str(tmp_path / "h.sqlite3"), "XPEFT_ADMIN_TOKEN": ADMIN},
        bank_path,
        tmp_path / "h.log",
    )
    settings = Settings()
    bound = head_memory_bound(
        settings.head_cache_bytes, settings.max_batch_size, settings.max_labels, bank.hidden_size
    )
    with running(server):
        url = server.url
        for n in range(4):
            assert httpx.put(
                f"{url}/profiles/small-{n}", content=profile_bytes(40 + n), headers=AUTH
            ).is_success
        wide = [f"intent-{i}" for i in range(settings.max_labels)]
        assert httpx.put(
            f"{url}/profiles/wide", content=profile_bytes(50, labels=wide), headers=AUTH
        ).is_success
        for n in range(4):  # warm: every small profile fused once, allocator settled
            predict_seconds(url, f"small-{n}", rounds=2)
        before_s = predict_seconds(url, "small-0")
        before = rss_bytes(server.pid)
        predict_seconds(url, "wide", rounds=2)  # the maximal profile, a full batch of it
        after_s = predict_seconds(url, "small-0")
        grown = rss_bytes(server.pid) - before
        assert grown <= bound, f"RSS grew {grown / 2**20:.0f} MiB; the bound is {bound / 2**20:.0f} MiB"
        assert after_s <= 1.6 * before_s + 0.05, (before_s, after_s)
        # the bound docs/DEPLOYMENT.md states next to the pod limits is this one (MiniLM: d = 384)
        assert (
            f"{bound:,} bytes" in (Path(__file__).resolve().parents[3] / "docs" / "DEPLOYMENT.md").read_text()
        )
