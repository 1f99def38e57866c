"""Profiles' lifecycle over HTTP, on both stores (a: Redis, c: SQLite): the stored file for backup
and moving, ETag and conditional writes, and uploads of identical bytes that change nothing."""

from __future__ import annotations

import hashlib
import uuid

import httpx
import pytest


@pytest.fixture(params=["redis", "sqlite"])
def server(request: pytest.FixtureRequest, cluster, admin_headers):
    """A client of one replica, with the admin token (it may read too), and the reader headers."""
    process = cluster.a if request.param == "redis" else cluster.c
    with httpx.Client(base_url=process.url, headers=admin_headers, timeout=30, trust_env=False) as client:
        yield client


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_file_is_the_stored_bytes_with_the_version_as_etag(server, profile_bytes) -> None:
    pid, data = _id("file"), profile_bytes(41)
    put = server.put(f"/profiles/{pid}", content=data)
    assert put.status_code == 201 and put.json()["unchanged"] is False
    tag = put.headers["etag"]
    assert tag == f'"{put.json()["version"]}"'
    got = server.get(f"/profiles/{pid}/file")
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["etag"] == tag and f'filename="{pid}.xpm"' in got.headers["content-disposition"]
    assert hashlib.sha256(got.content).hexdigest() == put.json()["sha256"]
    meta = server.get(f"/profiles/{pid}")
    assert meta.headers["etag"] == tag
    # conditional GETs: the current tag (weak too) gives 304 and no body; another tag the full answer
    for header in (tag, f"W/{tag}", f'"0", {tag}', "*"):
        for path in (f"/profiles/{pid}", f"/profiles/{pid}/file"):
            cached = server.get(path, headers={"If-None-Match": header})
            assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == tag
    assert server.get(f"/profiles/{pid}/file", headers={"If-None-Match": '"0"'}).content == data
    # the bytes move to another id (another deployment, likewise) and serve the same answers
    moved = server.put(f"/profiles/{pid}-copy", content=got.content)
    assert moved.status_code == 201 and moved.json()["sha256"] == put.json()["sha256"]
    texts = {"inputs": ["a lovely film"]}
    one = server.post(f"/profiles/{pid}/predict", json=texts).json()["predictions"]
    two = server.post(f"/profiles/{pid}-copy/predict", json=texts).json()["predictions"]
    assert one == two


def test_file_refusals(server, cluster, reader_headers, profile_bytes) -> None:
    assert server.get(f"/profiles/{_id('none')}/file").json()["error"] == "profile_not_found"
    wrong_method = server.post("/profiles/x/file")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
    # the same auth as the metadata: on c, reads need the API (or admin) token
    pid = _id("auth")
    server.put(f"/profiles/{pid}", content=profile_bytes(42))
    if server.base_url == httpx.URL(cluster.c.url):
        with httpx.Client(base_url=cluster.c.url, timeout=30, trust_env=False) as anonymous:
            assert anonymous.get(f"/profiles/{pid}/file").status_code == 401
            assert anonymous.get(f"/profiles/{pid}/file", headers=reader_headers).status_code == 200


def test_identical_upload_changes_nothing(server, profile_bytes) -> None:
    pid, data = _id("same"), profile_bytes(43)
    first = server.put(f"/profiles/{pid}", content=data).json()
    again = server.put(f"/profiles/{pid}", content=data)
    assert again.status_code == 200 and again.json()["unchanged"] is True
    assert again.json()["version"] == first["version"] and again.headers["etag"] == f'"{first["version"]}"'
    assert again.json()["updated_at"] == first["updated_at"]
    assert server.get(f"/profiles/{pid}").json()["version"] == first["version"]
    other = server.put(f"/profiles/{pid}", content=profile_bytes(44)).json()
    assert other["unchanged"] is False and other["version"] > first["version"]


def test_if_match_guards_put_and_delete(server, profile_bytes) -> None:
    pid = _id("match")
    v1 = server.put(f"/profiles/{pid}", content=profile_bytes(45))
    tag1 = v1.headers["etag"]
    v2 = server.put(f"/profiles/{pid}", content=profile_bytes(46), headers={"If-Match": tag1})
    assert v2.status_code == 200 and v2.json()["version"] > v1.json()["version"]
    # a writer still holding tag1 lost the race: refused, and nothing of it is stored
    stale = server.put(f"/profiles/{pid}", content=profile_bytes(47), headers={"If-Match": tag1})
    assert stale.status_code == 412 and stale.json()["error"] == "precondition_failed"
    assert (
        stale.json()["current_version"] == v2.json()["version"]
        and stale.headers["etag"] == v2.headers["etag"]
    )
    assert server.get(f"/profiles/{pid}/file").content == profile_bytes(46)
    weak = server.put(
        f"/profiles/{pid}", content=profile_bytes(47), headers={"If-Match": f"W/{v2.headers['etag']}"}
    )
    assert weak.status_code == 412  # If-Match compares strongly: a weak tag never matches
    gone = server.delete(f"/profiles/{pid}", headers={"If-Match": tag1})
    assert gone.status_code == 412 and server.get(f"/profiles/{pid}").status_code == 200
    deleted = server.delete(f"/profiles/{pid}", headers={"If-Match": f'"1", {v2.headers["etag"]}'})
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    # without a current version: a PUT with If-Match fails; a DELETE is a plain 404
    missing = server.put(f"/profiles/{pid}", content=profile_bytes(48), headers={"If-Match": "*"})
    assert missing.status_code == 412 and missing.json()["current_version"] is None
    assert server.get(f"/profiles/{pid}").status_code == 404
    assert server.delete(f"/profiles/{pid}", headers={"If-Match": "*"}).status_code == 404


def test_if_none_match_star_creates_only(server, profile_bytes) -> None:
    pid = _id("create")
    created = server.put(f"/profiles/{pid}", content=profile_bytes(49), headers={"If-None-Match": "*"})
    assert created.status_code == 201
    again = server.put(f"/profiles/{pid}", content=profile_bytes(50), headers={"If-None-Match": "*"})
    assert again.status_code == 412 and again.json()["current_version"] == created.json()["version"]
    assert server.get(f"/profiles/{pid}/file").content == profile_bytes(49)


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("PUT", {"If-Match": "17"}),  # no quotes
        ("PUT", {"If-Match": '"17'}),
        ("PUT", {"If-Match": ""}),
        ("PUT", {"If-None-Match": '"17"'}),  # a write takes only *
        ("PUT", {"If-Match": "*", "If-None-Match": "*"}),
        ("DELETE", {"If-None-Match": "*"}),
    ],
)
def test_malformed_conditions_are_refused_before_anything(server, profile_bytes, method, headers) -> None:
    pid = _id("bad")
    server.put(f"/profiles/{pid}", content=profile_bytes(51))
    before = server.get(f"/profiles/{pid}").json()["version"]
    answer = server.request(method, f"/profiles/{pid}", content=profile_bytes(52), headers=headers)
    assert answer.status_code == 422 and answer.json()["error"] == "invalid_request"
    assert server.get(f"/profiles/{pid}").json()["version"] == before
