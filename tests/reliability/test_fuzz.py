"""Fuzzing: schemathesis against the served OpenAPI schema, and over a thousand malformed ``.xpm``
uploads made from a valid file (testsupport/scenarios/xpm_fuzz.py). No 5xx, no crash, nothing stored
from a refused upload (the store itself is read afterwards).

Then hostile predict bodies near the body limit (half a million items, deep nesting, huge numbers,
60,000 keys): each refused in bounded time with a typed 4xx.

All are bounded and deterministic: schemathesis with hypothesis' ``derandomize`` and at most
``EXAMPLES`` cases per operation (8 operations), the upload corpus from a fixed seed.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
import zlib

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from testsupport.scenarios.xpm_fuzz import corpus
from xpeft.adapters.bank import create_random_bank
from xpeft.profiles import format as xpm
from xpeft.profiles.synthetic import random_profile

from .conftest import ADMIN, API, bearer

EXAMPLES = 30  # per operation; 8 operations -> at most about 240 generated cases
KNOWN = "fuzz-known"  # an existing profile, so that generated predict bodies reach the model


@pytest.fixture(scope="module")
def api_schema(fleet, make_profile):
    with httpx.Client(base_url=fleet.main.url, headers=bearer(ADMIN), timeout=30) as client:
        assert client.put(f"/profiles/{KNOWN}", content=make_profile(1)).status_code in (200, 201)
    return schemathesis.openapi.from_url(f"{fleet.main.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_fuzzing_finds_no_server_error_and_answers_match_the_schema(case, fleet) -> None:
    """Every generated request (valid and invalid) gets a documented status, content type and body shape."""
    if case.path.endswith("/predict") and zlib.crc32(repr(case.body).encode()) % 3:
        case.path_parameters = {"profile_id": KNOWN}  # two in three reach the model; the rest fuzz the id
    # A PUT body the schema allows (any bytes) is still refused unless it is a valid .xpm, and a
    # training body (any object or text) unless it holds trainable examples: expected.
    refusable = case.method == "PUT" or case.path.endswith("/train")
    excluded = [positive_data_acceptance] if refusable else []
    response = case.call_and_validate(headers=bearer(ADMIN), excluded_checks=excluded, timeout=30)
    assert response.status_code < 500
    assert fleet.main.alive()


# -- malformed .xpm uploads ----------------------------------------------------------------------
def _foreign(encoder) -> list[bytes]:
    """Valid profiles for other banks (another seed, another N): 409 bank_mismatch here."""
    other = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=20, seed=7
    )
    small = create_random_bank(
        encoder.num_layers, encoder.hidden_size, encoder.model_id, num_adapters=10, seed=1
    )
    return [
        xpm.encode(random_profile(b, kind, seed=i))
        for i, (b, kind) in enumerate(
            [
                (other, "hard"),
                (other, "soft"),
                (other, "units"),
                (small, "hard"),
                (small, "soft"),
                (small, "units"),
            ]
        )
    ]


async def _upload_all(
    url: str, uploads: list[tuple[str, bytes]], concurrency: int = 4
) -> list[httpx.Response]:
    queue = list(enumerate(uploads))
    out: list[httpx.Response | None] = [None] * len(uploads)
    async with httpx.AsyncClient(base_url=url, headers=bearer(ADMIN), timeout=30) as client:

        async def worker() -> None:
            while queue:
                i, (profile_id, data) = queue.pop()
                out[i] = await client.put(f"/profiles/{profile_id}", content=data)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out  # type: ignore[return-value]


def test_a_thousand_malformed_uploads_get_4xx_and_store_nothing(fleet, make_profile, encoder) -> None:
    main = fleet.main
    pid = main.pid
    valid = make_profile(42)
    mutants = corpus(valid, _foreign(encoder), n=1000, seed=0)
    assert len(mutants) >= 1000
    assert {m.category for m in mutants} >= {
        "random_bytes",
        "truncation",
        "bit_flip",
        "bit_flip_recrc",
        "header_edit",
        "huge_declared",
        "wrong_bank",
        "framing",
        "oversize",
    }
    # Each mutant under an id of its own, then 150 more as replacements of one stored profile.
    target = "fz-target"
    with httpx.Client(base_url=main.url, headers=bearer(ADMIN), timeout=30) as client:
        before = client.put(f"/profiles/{target}", content=valid).json()
    uploads = [(f"fz-{i}", m.data) for i, m in enumerate(mutants)]
    responses = asyncio.run(_upload_all(main.url, uploads))
    by_category = collections.Counter(
        (m.category, r.status_code) for m, r in zip(mutants, responses, strict=True)
    )
    # Refused files again, as replacements of a stored profile: it must keep its version and bytes.
    replacements = [
        (target, data)
        for (_, data), r in list(zip(uploads, responses, strict=True))[::6]
        if r.status_code >= 400
    ]
    uploads += replacements
    responses += asyncio.run(_upload_all(main.url, replacements))

    statuses = collections.Counter(r.status_code for r in responses)
    print(f"\n{len(responses)} uploads: {dict(statuses)}\n{dict(sorted(by_category.items()))}")
    assert not [s for s in statuses if s >= 500], statuses
    for response in responses:
        assert response.headers["content-type"].startswith("application/json")
        if response.status_code >= 400:
            assert response.json()["error"] in ("invalid_profile", "bank_mismatch", "too_large"), (
                response.text
            )
    refused = {pid_ for (pid_, _), r in zip(uploads, responses, strict=True) if r.status_code >= 400}
    accepted = {pid_: data for (pid_, data), r in zip(uploads, responses, strict=True) if r.status_code < 300}
    assert len(responses) >= 1100 and statuses[422] >= 900 and statuses[409] >= 4 and statuses[413] >= 2
    assert main.alive() and main.pid == pid
    assert httpx.get(f"{main.url}/healthz").status_code == 200

    # The store's contents: exactly the accepted ids, with their bytes; the target still holds its own.
    client = redis.Redis.from_url(fleet.redis_url)
    tag = "{" + fleet.prefix + "}"
    stored = {
        key.decode().split(":profile:", 1)[1] for key in client.scan_iter(f"{tag}:profile:fz-*", count=1000)
    }
    indexed = {m.decode() for m in client.zrangebylex(f"{tag}:ids", b"[fz-", b"[fz-\xff")}
    expected = {i for i in accepted if i != target} | {target}
    assert stored == indexed == expected, stored ^ expected
    assert not (refused - {target}) & stored  # refused on their own id: none stored
    for profile_id in expected - {target}:
        data = client.hget(f"{tag}:profile:{profile_id}", "data")
        assert data == accepted[profile_id]
    target_now = client.hmget(f"{tag}:profile:{target}", "version", "data")
    client.close()
    assert int(target_now[0]) == before["version"] and target_now[1] == valid

    # Whatever was accepted (a mutant can stay valid, e.g. another max_length) must also predict.
    with httpx.Client(base_url=main.url, headers=bearer(ADMIN), timeout=30) as http:
        for profile_id in sorted(expected):
            answer = http.post(f"/profiles/{profile_id}/predict", json={"inputs": ["x " * 1000]})
            assert answer.status_code == 200, (profile_id, answer.text)
            digest = hashlib.sha256(accepted.get(profile_id, valid)).hexdigest()
            assert http.get(f"/profiles/{profile_id}").json()["sha256"] == digest


# -- hostile predict bodies ----------------------------------------------------------------------
def _hostile_bodies() -> list[tuple[str, bytes]]:
    """Bodies near the ``replica``'s 1 MiB limit (or small and odd) whose cost must stay bounded."""
    n = 120_000
    return [
        ("500k zeros", b'{"inputs":[' + b"0," * 499_999 + b"0]}"),
        ("many short texts", b'{"inputs":[' + b'"a",' * (n * 2 - 1) + b'"a"]}'),
        ("many pairs", b'{"inputs":[' + b'["a","b"],' * (n // 2 - 1) + b'["a","b"]]}'),
        ("many nulls", b'{"inputs":[' + b"null," * (n * 2 - 1) + b"null]}"),
        ("many empty lists", b'{"inputs":[' + b"[]," * (n * 2) + b"[]]}"),
        ("deep nesting", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("many keys", b"{" + b",".join(b'"k%d":0' % i for i in range(60_000)) + b"}"),
        ("a huge number", b'{"inputs":[' + b"9" * 900_000 + b"]}"),
        ("a huge float", b'{"inputs":[1e' + b"9" * 100_000 + b"]}"),
        ("escaped text", b'{"inputs":["' + b"\\u00e9" * 150_000 + b'"]}'),
        ("a lone surrogate", b'{"inputs":["\\udc00"]}'),
        ("duplicate keys", b'{"inputs":["a"],"inputs":' + b"[0]" + b"}"),
        ("NaN", b'{"inputs":[NaN]}'),
        ("not UTF-8", b'{"inputs":["\xff\xfe"]}'),
        ("a list body", b"[" + b"0," * 400_000 + b"0]"),
        ("truncated", b'{"inputs":["a", ' + b'"b",' * 100_000),
    ]


def test_hostile_predict_bodies_are_refused_fast_with_a_typed_error(fleet, make_profile) -> None:
    """Each within 2 s (4 s once at most, for a busy machine) with 413 or 422 and a stable code;
    the replica stays alive and ``/healthz`` answers right after."""
    with httpx.Client(base_url=fleet.replica.url, timeout=30) as client:
        assert client.put("/profiles/fz-host", content=make_profile(2), headers=bearer(ADMIN)).is_success
        slow = []
        for name, body in _hostile_bodies():
            start = time.perf_counter()
            answer = client.post(
                "/profiles/fz-host/predict",
                content=body,
                headers={**bearer(API), "Content-Type": "application/json"},
            )
            took = time.perf_counter() - start
            assert (answer.status_code, answer.json()["error"]) in {
                (422, "invalid_request"),
                (413, "too_large"),
            }, (name, answer.text[:200])
            if took > 2.0:
                slow.append((name, took))
            assert client.get("/healthz", timeout=5).status_code == 200
        assert len(slow) <= 1 and all(took < 4.0 for _, took in slow), slow
    assert fleet.replica.alive()
