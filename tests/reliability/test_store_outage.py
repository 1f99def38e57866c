"""Store outage under steady load (testsupport/scenarios/outage.py runs the timeline; a longer run of the
same code is ``python -m bench.reliability.run``, whose figures docs/RELIABILITY.md reports).

Redis first hangs (SIGSTOP: connections stay open, nothing answers), then crashes (SIGKILL) and
restarts from its append-only file, as the compose deployment runs it.
"""

from __future__ import annotations

import asyncio

from testsupport.scenarios.outage import OutageConfig, phase_of, run_outage

from .conftest import ADMIN

STORE_TIMEOUT_S = 0.5  # the outage server's XPEFT_STORE_TIMEOUT_S
REQUEST_TIMEOUT_S = 3.0


def test_store_outage_cached_profiles_keep_answering_and_nothing_acknowledged_is_lost(
    fleet, make_profile
) -> None:
    server = fleet.outage
    pid = server.pid
    result = asyncio.run(
        run_outage(
            server.url,
            fleet.outage_redis,
            "outage",
            ADMIN,
            make_profile,
            pid,
            OutageConfig(warm_s=1.5, pause_s=2.0, gap_s=2.0, down_s=2.0, recovery_s=2.5),
        )
    )
    marks, outcomes = result["marks"], result["outcomes"]
    print(
        "\n",
        {
            phase: {kind: v["statuses"] for kind, v in kinds.items()}
            for phase, kinds in result["phases"].items()
        },
        result["recovery"],
        {k: v for k, v in result["store"].items() if not isinstance(v, list)},
    )

    # Cached profiles answer throughout, from the right profile, and nothing waits past the request timeout.
    hot = [o for o in outcomes if o.kind == "hot"]
    assert hot and {o.status for o in hot} == {200}, result["phases"]
    assert result["consistency_errors"] == 0
    assert max(o.latency for o in outcomes) < REQUEST_TIMEOUT_S
    # The store is back at "resume" (SIGCONT) and at "restart" (redis-server started again; "up" is
    # only marked once the harness has seen it answer, and requests may succeed in between).
    for fault, back, cleared in (("pause", "resume", "resume"), ("kill", "restart", "up")):
        hot_during = [o for o in hot if marks[fault] <= o.start < marks[cleared]]
        assert len(hot_during) >= 5, f"too little traffic while the store was down ({fault})"

        # Requests that needed the store, made and answered entirely within the fault: 503 store_unavailable,
        # within the store timeout (plus scheduling slack on a busy machine).
        inside = [
            o
            for o in outcomes
            if o.kind in ("cold", "put") and marks[fault] + 0.05 <= o.start and o.end <= marks[back]
        ]
        assert {o.kind for o in inside} == {"cold", "put"}, f"no store-bound traffic during the {fault}"
        assert {(o.status, o.code) for o in inside} == {(503, "store_unavailable")}, inside
        assert max(o.latency for o in inside) < STORE_TIMEOUT_S + 1.0

        # ... and the replica recovers by itself: store-bound requests succeed again soon after.
        for kind in ("cold", "put"):
            recovered = result["recovery"][f"{kind}_after_{fault}_s"]
            assert recovered is not None and recovered < 2.0, result["recovery"]
    late = [o for o in outcomes if o.start >= marks["up"] + 1.0]
    assert late and all(200 <= o.status < 300 for o in late), [o for o in late if o.status >= 300][:5]
    assert {phase_of(o, marks) for o in outcomes} == {"before", "paused", "between", "down", "after"}

    # No acknowledged PUT was lost across the crash and AOF restart; nothing refused while Redis was dead was stored.
    store = result["store"]
    assert store["acked_puts"] >= 10 and store["lost_acked_ids"] == [], store
    assert store["refused_ids"] >= 1 and store["refused_but_stored"] == [], store
    assert store["seq"] >= store["max_acked_version"]
    # The same process served throughout (no restart), and is ready again.
    assert server.pid == pid and server.alive() and result["ready_after"] == 200
