"""One contract, three stores: the embedded SQLite store, the Redis store and the Redis Cluster
store (on a real 3-master cluster on loopback) behave the same."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from xpeft.server.stores.base import (
    ChangeEvent,
    Condition,
    PreconditionFailed,
    ProfileStore,
    StoreUnavailable,
)
from xpeft.server.stores.redis_cluster_store import RedisClusterStore
from xpeft.server.stores.redis_store import RedisStore
from xpeft.server.stores.sqlite_store import SQLiteStore

T = TypeVar("T")
StoreFactory = Callable[[], ProfileStore]


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A factory of store instances that share one backend (as two replicas would)."""
    if request.param == "sqlite":
        path = tmp_path / "store.sqlite3"
        return lambda: SQLiteStore(path, poll_s=0.02)
    if request.param == "redis-cluster":
        nodes = request.getfixturevalue("redis_cluster")
        url = nodes.url(nodes.masters()[0])
        prefix = f"xpeft-contract-{uuid.uuid4().hex[:8]}"
        request.addfinalizer(lambda: nodes.delete_matching("{" + prefix + "#*"))
        return lambda: RedisClusterStore(url, prefix, timeout_s=5)
    url = request.getfixturevalue("redis_url")
    prefix = f"{request.getfixturevalue('redis_prefix')}-{uuid.uuid4().hex[:8]}"  # a namespace per test
    request.addfinalizer(lambda: _delete_keys(url, prefix))
    return lambda: RedisStore(url, prefix)


def _delete_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{{{prefix}}}*"))
    if keys:
        client.delete(*keys)
    client.close()


@contextlib.asynccontextmanager
async def watching(store: ProfileStore) -> AsyncIterator[list[ChangeEvent]]:
    """The events ``store.watch()`` yields, collected from the resync marker on (waited for)."""
    events: list[ChangeEvent] = []

    async def collect() -> None:
        async for event in store.watch():
            events.append(event)

    task = asyncio.create_task(collect())
    try:
        for _ in range(100):  # the first event is the resync marker: subscribed from here on
            if events:
                break
            await asyncio.sleep(0.01)
        yield events
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_for_events(events: list[ChangeEvent], count: int, within_s: float = 1.0) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while len(events) < count and loop.time() - start < within_s:
        await asyncio.sleep(0.005)


def test_put_get_replace(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            assert await store.get("p") is None and await store.get_record("p") is None
            rec1, created1, _ = await store.put("p", b"\x00one\xff", {"kind": "hard", "labels": ["a", "b"]})
            assert created1 and rec1.version >= 1
            got = await store.get("p")
            assert got is not None and got.data == b"\x00one\xff" and got.version == rec1.version
            assert got.meta == {"kind": "hard", "labels": ["a", "b"]}
            rec2, created2, _ = await store.put("p", b"two", {"kind": "soft"})
            assert not created2 and rec2.version > rec1.version
            assert rec2.created_at == pytest.approx(rec1.created_at) and rec2.updated_at >= rec1.updated_at
            got = await store.get("p")
            assert got is not None and (got.data, got.version, got.meta) == (
                b"two",
                rec2.version,
                {"kind": "soft"},
            )
            record = await store.get_record("p")
            assert record is not None and record.version == rec2.version and record.meta == {"kind": "soft"}
            assert record.as_dict()["id"] == "p" and record.as_dict()["created_at"].endswith("Z")
        finally:
            await store.close()

    run(body())


def test_versions_increase_across_ids_and_deletes(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            seen = []
            for profile_id, data in (("a", b"x"), ("b", b"x"), ("a", b"x2")):
                record, _, _ = await store.put(profile_id, data, {})
                seen.append(record.version)
            deleted = await store.delete("a")
            assert deleted is not None
            seen.append(deleted)
            again, created, _ = await store.put("a", b"y", {})
            assert created  # a deleted id comes back as new ...
            seen.append(again.version)
            assert seen == sorted(set(seen))  # ... with a version above every earlier one
            assert await store.current_seq() == again.version
            assert await store.versions(["a", "b", "missing"]) == {"a": again.version, "b": seen[1]}
            assert await store.versions([]) == {}
        finally:
            await store.close()

    run(body())


def test_delete(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            await store.put("gone", b"x", {})
            assert await store.delete("gone") is not None
            assert await store.get("gone") is None and await store.get_record("gone") is None
            assert await store.delete("gone") is None
            assert await store.delete("never") is None
            assert (await store.list(None, 10))[0] == []
        finally:
            await store.close()

    run(body())


def test_list_pages_in_id_order(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            ids = [f"p{i:02d}" for i in range(23)] + ["A-first", "z.last"]
            for profile_id in reversed(ids):
                await store.put(profile_id, profile_id.encode(), {"n": profile_id})
            await store.delete("p05")
            listed, cursor, pages = [], None, 0
            while True:
                records, cursor = await store.list(cursor, 10)
                assert len(records) <= 10
                listed += [(r.id, r.meta["n"]) for r in records]
                pages += 1
                if cursor is None:
                    break
            expected = sorted(i for i in ids if i != "p05")
            assert [i for i, _ in listed] == expected and all(i == n for i, n in listed)
            assert pages == 3
            records, cursor = await store.list("p20", 100)
            assert [r.id for r in records] == ["p21", "p22", "z.last"] and cursor is None
        finally:
            await store.close()

    run(body())


def test_watch_sees_writes_of_another_instance_within_a_second(new_store: StoreFactory) -> None:
    async def body() -> None:
        watcher, writer = new_store(), new_store()
        try:
            async with watching(watcher) as events:
                assert events and events[0].id is None
                put = (await writer.put("w", b"1", {})).record
                deleted = await writer.delete("w")
                await wait_for_events(events, 3)
                assert [(e.id, e.version, e.deleted) for e in events[1:]] == [
                    ("w", put.version, False),
                    ("w", deleted, True),
                ]
                assert events[1].published_at is not None
        finally:
            await watcher.close()
            await writer.close()

    run(body())


def test_concurrent_writers_keep_bytes_and_version_together(new_store: StoreFactory) -> None:
    """Two instances write one id at once: every read pairs bytes with their own version."""

    async def body() -> None:
        one, two = new_store(), new_store()
        try:

            async def writer(store: ProfileStore, tag: str) -> list[int]:
                versions = []
                for i in range(15):
                    data, meta = f"{tag}{i}".encode(), {"tag": f"{tag}{i}"}
                    record = (await store.put("race", data, meta)).record
                    versions.append(record.version)
                return versions

            async def reader() -> int:
                checked = 0
                for _ in range(30):
                    got = await one.get("race")
                    if got is not None:
                        assert got.data.decode() == got.meta["tag"]
                        checked += 1
                    await asyncio.sleep(0)
                return checked

            v1, v2, _ = await asyncio.gather(writer(one, "a"), writer(two, "b"), reader())
            assert len(set(v1) | set(v2)) == 30  # no version given twice
            final = await two.get("race")
            assert final is not None and final.version == max(v1 + v2)
            assert final.data.decode() == final.meta["tag"]
        finally:
            await one.close()
            await two.close()

    run(body())


def test_identical_put_is_unchanged_no_version_no_event(new_store: StoreFactory) -> None:
    """The same bytes and metadata again: the stored record as it was, no version, no event."""

    async def body() -> None:
        watcher, store = new_store(), new_store()
        try:
            async with watching(watcher) as events:
                first = await store.put("same", b"\x00bytes", {"kind": "hard"})
                assert first.created and not first.unchanged
                seq = await store.current_seq()
                again = await store.put("same", b"\x00bytes", {"kind": "hard"})
                assert again.unchanged and not again.created
                assert again.record.version == first.record.version == seq == await store.current_seq()
                assert again.record.updated_at == pytest.approx(first.record.updated_at)
                # other bytes, or the same bytes with other metadata, are a new version
                changed = await store.put("same", b"\x00bytes", {"kind": "soft"})
                assert not changed.unchanged and changed.record.version > seq
                changed2 = await store.put("same", b"\x00other", {"kind": "soft"})
                assert not changed2.unchanged and changed2.record.version > changed.record.version
                await wait_for_events(events, 4)
                await asyncio.sleep(0.1)  # room for an event that should not come
                versions = [e.version for e in events if e.id == "same"]
                assert versions == [first.record.version, changed.record.version, changed2.record.version]
        finally:
            await watcher.close()
            await store.close()

    run(body())


def test_conditional_put_and_delete(new_store: StoreFactory) -> None:
    """If-Match / If-None-Match semantics: a failed condition raises and writes nothing."""

    async def body() -> None:
        store = new_store()
        try:
            with pytest.raises(PreconditionFailed) as err:  # If-Match on an id that does not exist
                await store.put("c", b"1", {}, Condition(versions=frozenset({1})))
            assert err.value.current is None and err.value.code == "precondition_failed"
            with pytest.raises(PreconditionFailed):  # If-Match: * likewise
                await store.put("c", b"1", {}, Condition(exists=True))
            assert await store.get("c") is None and await store.current_seq() == 0
            v1 = (await store.put("c", b"1", {}, Condition(exists=False))).record.version  # create only
            with pytest.raises(PreconditionFailed) as err:  # create only, but it exists
                await store.put("c", b"2", {}, Condition(exists=False))
            assert err.value.current == v1
            for stale in (frozenset({v1 + 100}), frozenset()):  # another version; no strong tag at all
                with pytest.raises(PreconditionFailed) as err:
                    await store.put("c", b"2", {}, Condition(versions=stale))
                assert err.value.current == v1
                with pytest.raises(PreconditionFailed):
                    await store.delete("c", Condition(versions=stale))
            got = await store.get("c")
            assert got is not None and (got.data, got.version) == (b"1", v1)
            assert await store.current_seq() == v1  # nothing was written, not even a change entry
            v2 = (await store.put("c", b"2", {}, Condition(versions=frozenset({v1, 7})))).record.version
            assert v2 > v1
            again = await store.put("c", b"2", {}, Condition(versions=frozenset({v2})))
            assert again.unchanged and again.record.version == v2
            with pytest.raises(PreconditionFailed):  # the old tag no longer matches
                await store.delete("c", Condition(versions=frozenset({v1})))
            deleted = await store.delete("c", Condition(exists=True, versions=frozenset({v2})))
            assert deleted is not None and deleted > v2
            # a delete of a missing id is "not found" whatever the condition (HTTP: 404, not 412)
            assert await store.delete("c", Condition(versions=frozenset({v2}))) is None
        finally:
            await store.close()

    run(body())


def test_conditional_writers_race_one_wins(new_store: StoreFactory) -> None:
    """Two instances update one version at once with If-Match: exactly one of them writes."""

    async def body() -> None:
        one, two = new_store(), new_store()
        try:
            base = (await one.put("r", b"base", {})).record.version
            for round_ in range(10):
                expect = frozenset({base})
                results = await asyncio.gather(
                    one.put("r", f"one{round_}".encode(), {}, Condition(versions=expect)),
                    two.put("r", f"two{round_}".encode(), {}, Condition(versions=expect)),
                    return_exceptions=True,
                )
                won = [r for r in results if not isinstance(r, BaseException)]
                lost = [r for r in results if isinstance(r, PreconditionFailed)]
                assert len(won) == 1 and len(lost) == 1, results
                got = await one.get("r")
                assert got is not None and got.version == won[0].record.version == lost[0].current
                base = got.version
        finally:
            await one.close()
            await two.close()

    run(body())


def test_meta_round_trips_as_json(new_store: StoreFactory) -> None:
    async def body() -> None:
        store = new_store()
        try:
            meta = {"labels": ["négatif", "positif"], "meta": {"k": "v"}, "bytes": 12, "sha256": "ab" * 32}
            await store.put("m", b"x" * 100_000, meta)
            got = await store.get("m")
            assert got is not None and got.meta == meta and len(got.data) == 100_000
            assert json.dumps(got.as_dict())  # serialisable as the API returns it
            await store.ping()
        finally:
            await store.close()

    run(body())


@pytest.mark.parametrize("kind", [RedisStore, RedisClusterStore])
def test_unreachable_redis_raises_store_unavailable_quickly(
    kind: type[RedisStore | RedisClusterStore],
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def body() -> None:
        store = kind(f"redis://127.0.0.1:{port}/0", "down", timeout_s=0.5)
        start = time.perf_counter()
        for op in (
            store.get("p"),
            store.put("p", b"x", {}),
            store.delete("p"),
            store.list(None, 10),
            store.versions(["p"]),
            store.current_seq(),
            store.ping(),
        ):
            with pytest.raises(StoreUnavailable) as err:
                await op
            assert err.value.code == "store_unavailable"
        assert time.perf_counter() - start < 7 * 2.0
        await store.close()

    run(body())


def test_unusable_sqlite_path_raises_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "a-directory.sqlite3").mkdir()
    with pytest.raises(StoreUnavailable) as err:
        SQLiteStore(tmp_path / "a-directory.sqlite3")
    assert err.value.code == "store_unavailable"
