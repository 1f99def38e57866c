"""Concurrent updates (testsupport/scenarios/updates.py): new versions of one profile are PUT on one
replica while many predicts for it run on both replicas. Every answer's ``version`` must match its
scores, checked against the offline model's predictions for each version's bytes, so a
half-updated profile, or one version's scores reported as another's, would fail.
"""

from __future__ import annotations

import asyncio
import itertools

from testsupport.scenarios.updates import run_updates
from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm

from .conftest import ADMIN, API, bearer

TEXTS = ["a gripping, beautifully acted film", "the plot is dull and the jokes are stale"]
ATOL = 1e-4


def test_every_answer_matches_the_version_it_reports(fleet, make_profile, encoder, bank) -> None:
    files = [make_profile(900 + i, ["neg", "pos"]) for i in range(6)]  # the same labels: only scores tell
    offline = MultiProfileModel(encoder, bank)
    expected = [[p.scores for p in offline.predict(xpm.decode(data, bank), TEXTS)] for data in files]
    # the check has power: any two files differ by far more than the tolerance on some score
    for a, b in itertools.combinations(expected, 2):
        assert max(abs(x["pos"] - y["pos"]) for x, y in zip(a, b, strict=True)) > 100 * ATOL

    result = asyncio.run(
        run_updates(
            fleet.main.url,
            [fleet.main.url, fleet.replica.url],
            bearer(ADMIN),
            bearer(API),
            "cu-1",
            files,
            expected,
            TEXTS,
            puts=14,
            atol=ATOL,
        )
    )
    print("\n", {k: v for k, v in result.items() if k != "mismatches"})
    assert result["failures"] == [] and result["mismatches"] == []
    assert result["answers"] >= 100 and result["versions_seen"] >= 8  # many versions, read mid-update
    assert all(n >= 20 for n in result["answers_by_replica"].values())  # on both replicas
