"""Abstention over HTTP: the answer says so, a request moves the operating point, metrics count it."""

from __future__ import annotations

import json
import re
import struct
import zlib

import httpx
import pytest

from xpeft.engine.runtime import MultiProfileModel
from xpeft.profiles import format as xpm
from xpeft.profiles.format_header import PREFIX
from xpeft.profiles.synthetic import random_profile, random_rule
from xpeft.server.client import Client

TEXTS = ["the film was superb", "set an alarm for seven", "what a dull meal", "how tall is everest"]


@pytest.fixture(scope="module")
def ruled(bank) -> bytes:
    """A profile whose rule abstains on about half of the inputs (operating point 0.5)."""
    profile = random_profile(bank, "hard", seed=21, labels=["neg", "pos"])
    profile.abstain = random_rule(2, seed=1, min_confidence=0.5)
    return xpm.encode(profile)


def _abstentions(client: httpx.Client, profile_id: str) -> float:
    text = client.get("/metrics").text
    found = re.search(rf'^xpeft_abstentions_total{{profile="{profile_id}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_predictions_abstain_as_the_offline_api_does(cluster, admin_headers, ruled, encoder, bank) -> None:
    offline = MultiProfileModel(encoder, bank).predict(xpm.decode(ruled, bank), TEXTS)
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        assert client.put("/profiles/abst-a", content=ruled, headers=admin_headers).status_code in (200, 201)
        assert client.get("/profiles/abst-a").json()["abstain"] == "msp"
        before = _abstentions(client, "abst-a")
        body = client.post("/profiles/abst-a/predict", json={"inputs": TEXTS}).json()
        after = _abstentions(client, "abst-a")
    got = body["predictions"]
    assert [p["abstained"] for p in got] == [p.abstained for p in offline]
    for p, want in zip(got, offline, strict=True):
        assert p["confidence"] == pytest.approx(want.confidence, abs=1e-4)
        assert p["label"] == (None if p["abstained"] else max(p["scores"], key=p["scores"].get))
    assert after - before == sum(p["abstained"] for p in got)


def test_a_request_moves_its_own_operating_point(cluster, admin_headers, ruled) -> None:
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        client.put("/profiles/abst-b", content=ruled, headers=admin_headers)
        never = client.post("/profiles/abst-b/predict", json={"inputs": TEXTS, "min_confidence": 0}).json()
        always = client.post("/profiles/abst-b/predict", json={"inputs": TEXTS, "min_confidence": 1}).json()
        default = client.post("/profiles/abst-b/predict", json={"inputs": TEXTS}).json()
    assert not any(p["abstained"] for p in never["predictions"])
    for p in always["predictions"]:  # at 1 only a score above every held-out one is kept
        assert p["abstained"] == (p["confidence"] < 1.0)
    assert [p["confidence"] for p in default["predictions"]] == [
        p["confidence"] for p in never["predictions"]
    ]
    with Client(cluster.a.url) as sdk:
        assert not any(
            p["abstained"] for p in sdk.predict("abst-b", TEXTS, min_confidence=0.0)["predictions"]
        )


@pytest.mark.parametrize("point", [1.5, -0.1, "high", True])
def test_an_operating_point_outside_0_1_is_refused(cluster, admin_headers, ruled, point) -> None:
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        client.put("/profiles/abst-c", content=ruled, headers=admin_headers)
        answer = client.post("/profiles/abst-c/predict", json={"inputs": TEXTS, "min_confidence": point})
    assert answer.status_code == 422 and answer.json()["error"] == "invalid_request"
    assert "min_confidence" in answer.json()["message"]


def test_profiles_without_a_rule_never_abstain(cluster, admin_headers, profile_bytes) -> None:
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        client.put("/profiles/abst-plain", content=profile_bytes(5, "soft"), headers=admin_headers)
        body = client.post("/profiles/abst-plain/predict", json={"inputs": TEXTS, "min_confidence": 1}).json()
    assert all(
        p["abstained"] is False and p.get("confidence") is None and p["label"] for p in body["predictions"]
    )


def _one_label(blob: bytes) -> bytes:
    """``blob`` with a rule but a header of one label: checksum redone, so only the label count is wrong."""
    _, version, length = PREFIX.unpack_from(blob)
    header = json.loads(blob[PREFIX.size : PREFIX.size + length])
    header["labels"] = header["labels"][:1]
    raw = json.dumps(header).encode()
    body = PREFIX.pack(b"\x89XPM", version, len(raw)) + raw + blob[PREFIX.size + length : -4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_rule_in_a_one_label_file_is_refused_and_nothing_stored(cluster, admin_headers, ruled) -> None:
    with httpx.Client(base_url=cluster.a.url, timeout=30) as client:
        answer = client.put("/profiles/abst-one", content=_one_label(ruled), headers=admin_headers)
        assert answer.status_code == 422 and answer.json()["error"] == "invalid_profile"
        assert "at least 2 labels" in answer.json()["message"]
        assert client.get("/profiles/abst-one").status_code == 404
