"""Host and device caches, their invalidation, the sync loop, and the model worker on real MiniLM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.batcher import Job
from xpeft.engine.cache import CachedProfile, FusedCache, VersionFloors
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm
from xpeft.server.cache import ProfileCache
from xpeft.server.metrics import Metrics
from xpeft.server.stores.sqlite_store import SQLiteStore
from xpeft.server.sync import CacheSync


def sample(metrics: Metrics, cache: str, event: str) -> float:
    return (
        metrics.registry.get_sample_value("xpeft_cache_events_total", {"cache": cache, "event": event}) or 0.0
    )


class SlowStore(SQLiteStore):
    """A real SQLite store whose reads can be held, to force the load-versus-write race."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, poll_s=0.02)
        self.gets = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def get(self, profile_id: str):
        self.gets += 1
        result = await super().get(profile_id)
        await self.hold.wait()
        return result


def make_cache(store, bank, size: int = 100) -> tuple[ProfileCache, Metrics]:
    metrics = Metrics()
    fused = FusedCache(10**8, VersionFloors(), metrics.engine())
    return ProfileCache(store, lambda data: xpm.decode(data, bank), size, fused, metrics), metrics


def test_profile_cache_loads_once_for_many_callers(bank, profile_bytes, tmp_path) -> None:
    async def body() -> None:
        store = SlowStore(tmp_path / "s.sqlite3")
        cache, metrics = make_cache(store, bank)
        record = (await store.put("p", profile_bytes(1), {})).record
        store.hold.clear()
        waiting = [asyncio.create_task(cache.get("p")) for _ in range(20)]
        await asyncio.sleep(0.05)
        store.hold.set()
        entries = await asyncio.gather(*waiting)
        assert store.gets == 1 and all(e is entries[0] for e in entries)
        assert entries[0].version == record.version and entries[0].profile.labels == ["negative", "positive"]
        assert await cache.get("p") is entries[0] and store.gets == 1  # now a hit
        assert sample(metrics, "profile", "hit") == 1
        assert await cache.get("nope") is None
        await store.close()

    asyncio.run(body())


def test_a_load_that_races_a_newer_write_is_not_cached(bank, profile_bytes, tmp_path) -> None:
    async def body() -> None:
        store = SlowStore(tmp_path / "s.sqlite3")
        cache, _ = make_cache(store, bank)
        await store.put("p", profile_bytes(1), {})
        store.hold.clear()
        loading = asyncio.create_task(cache.get("p"))  # reads version 1, then is held
        await asyncio.sleep(0.05)
        record = (await store.put("p", profile_bytes(2, labels=["x", "y"]), {})).record
        cache.invalidate("p", record.version)  # the event for version 2 arrives first
        store.hold.set()
        entry = await loading
        assert entry.version == record.version and entry.profile.labels == ["x", "y"]
        assert cache.cached_version("p") == record.version
        await store.close()

    asyncio.run(body())


def test_host_cache_evicts_by_count_and_takes_fused_weights_along(
    bank, profile_bytes, tmp_path, keep
) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3")
        cache, metrics = make_cache(store, bank, size=2)
        for name in ("a", "b", "c"):
            await store.put(name, profile_bytes(ord(name)), {})
        a = await cache.get("a")
        keep(cache.fused, a.key, FusedAdapters.zeros(2, 8, 4))
        await cache.get("b")
        await cache.get("c")
        assert len(cache) == 2 and cache.cached_version("a") is None and a.key not in cache.fused
        assert sample(metrics, "profile", "eviction") == 1
        await store.close()

    asyncio.run(body())


def test_sync_applies_events_and_catches_missed_ones(bank, profile_bytes, tmp_path, keep) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "s.sqlite3", poll_s=0.02)
        cache, metrics = make_cache(store, bank)
        sync = CacheSync(store, cache, metrics, check_s=10)
        v1 = (await store.put("p", profile_bytes(1), {})).record
        assert (await cache.get("p")).version == v1.version
        keep(cache.fused, ("p", v1.version), FusedAdapters.zeros(2, 8, 4))

        # the feed: an event drops both caches' old copies
        task = asyncio.create_task(sync._listen())
        v2 = (await store.put("p", profile_bytes(2), {})).record
        for _ in range(100):
            if cache.cached_version("p") is None:
                break
            await asyncio.sleep(0.01)
        assert cache.cached_version("p") is None and ("p", v1.version) not in cache.fused
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

        # with no feed, the version check notices within two checks
        assert (await cache.get("p")).version == v2.version
        await sync.check_once()  # nothing missed so far
        assert cache.cached_version("p") == v2.version
        v3 = (await store.put("p", profile_bytes(3), {})).record  # nobody tells the cache
        await sync.check_once()
        assert cache.cached_version("p") == v2.version  # the feed may still deliver it
        await sync.check_once()
        assert cache.cached_version("p") is None
        assert (await cache.get("p")).version == v3.version
        assert metrics.registry.get_sample_value("xpeft_invalidations_total", {"kind": "missed"}) == 1

        # a counter that went backwards means a reset store: everything goes
        sync.seen = {"": v3.version + 100}
        await sync.check_once()
        assert len(cache) == 0
        await store.close()

    asyncio.run(body())


def test_worker_fuses_cold_profiles_together_once_and_matches_the_model(encoder, bank, profile_bytes) -> None:
    model = MultiProfileModel(encoder, bank)
    metrics = Metrics()
    worker = ModelWorker(FusedCache(10**8, VersionFloors(), metrics.engine()), metrics.engine())
    worker.model = model
    profiles = [
        CachedProfile(f"p{i}", 1, xpm.decode(profile_bytes(i, kind), bank))
        for i, kind in enumerate(["hard", "soft", "single_adapter", "head_only"])
    ]
    calls = []
    real_fuse = model.fuse_into_pool
    model.fuse_into_pool = lambda pool, slots, ps: calls.append(len(ps)) or real_fuse(pool, slots, ps)  # type: ignore[method-assign]
    texts = [["a fine day"], ["rain again", "sun"], ["meh"], ["wow"]]
    jobs = [Job(p, t, None) for p, t in zip(profiles, texts, strict=True)]  # type: ignore[arg-type]
    first = worker.run(jobs + [Job(profiles[0], ["twice"], None)])  # type: ignore[arg-type]
    assert calls == [4]  # four distinct cold profiles, one batched fusion
    second = worker.run(jobs)
    assert calls == [4] and metrics.registry.get_sample_value("xpeft_fused_profiles_total") == 4
    for p, t, got, again in zip(profiles, texts, first, second, strict=False):
        expected = model.predict(p.profile, t)
        assert [g.label for g in got] == [e.label for e in expected] == [a.label for a in again]
        for g, e in zip(got, expected, strict=True):
            assert g.score == pytest.approx(e.score, abs=1e-5)
    worker.shutdown()


def test_worker_tokenizes_requests_on_its_own_thread_and_predicts_the_same(
    encoder, bank, profile_bytes
) -> None:
    """Requests tokenized ahead on the tokenizer thread (pairs and two max lengths in one batch)
    predict what the model predicts when it tokenizes them itself."""
    import threading

    model = MultiProfileModel(encoder, bank)
    metrics = Metrics()
    worker = ModelWorker(FusedCache(10**8, VersionFloors(), metrics.engine()), metrics.engine())
    worker.model = model
    short = xpm.decode(profile_bytes(0, "hard"), bank)
    short.max_length = 6  # cuts the long text: its tokens must be cut the same way ahead
    profiles = [
        CachedProfile("a", 1, short),
        CachedProfile("b", 1, xpm.decode(profile_bytes(1, "units"), bank)),
    ]
    texts = [["a rather long sentence that six tokens cannot hold", "ok"], [("a pair", "of texts"), "sun"]]
    threads = []
    real = encoder.token_ids
    encoder.token_ids = lambda *a: threads.append(threading.current_thread().name) or real(*a)  # type: ignore[method-assign]

    async def prepared() -> list[Job]:
        jobs = [Job(p, t, None) for p, t in zip(profiles, texts, strict=True)]  # type: ignore[arg-type]
        for job in jobs:
            await worker.prepare(job)
        return jobs

    jobs = asyncio.run(prepared())
    assert all(name.startswith("xpeft-tokenize") for name in threads) and len(threads) == 2
    assert len(jobs[0].token_ids[0]["input_ids"]) == 6  # type: ignore[index]
    got = worker.run(jobs)
    want = model.predict_batch([(p.profile, t) for p, t in zip(profiles, texts, strict=True)])
    for g_rows, w_rows in zip(got, want, strict=True):
        for g, w in zip(g_rows, w_rows, strict=True):
            assert g.label == w.label and g.score == pytest.approx(w.score, abs=1e-5)
    worker.shutdown()


def test_requests_arriving_together_share_one_tokenizer_call_and_a_refused_one_fails_alone(
    encoder, bank, profile_bytes
) -> None:
    """Requests that wait while the tokenizer runs are tokenized in one call; an input the
    tokenizer refuses fails only its own request, the others of its group are still tokenized."""
    model = MultiProfileModel(encoder, bank)
    worker = ModelWorker(FusedCache(10**8, VersionFloors()))
    worker.model = model
    entry = CachedProfile("a", 1, xpm.decode(profile_bytes(0, "units"), bank))
    calls: list[int] = []
    real = encoder.token_ids

    def token_ids(inputs, lengths):  # type: ignore[no-untyped-def]
        calls.append(len(inputs))
        if any(x == "refuse me" for x in inputs):
            raise ValueError("the tokenizer refuses it")
        return real(inputs, lengths)

    encoder.token_ids = token_ids  # type: ignore[method-assign]
    try:

        async def prepared() -> tuple[list[Job], list[BaseException | None]]:
            jobs = [Job(entry, t, None) for t in (["one"], ["two", "three"], ["four"])]  # type: ignore[arg-type]
            together = await asyncio.gather(*(worker.prepare(j) for j in jobs), return_exceptions=True)
            bad = Job(entry, ["five", "refuse me"], None)  # type: ignore[arg-type]
            good = Job(entry, ["six"], None)  # type: ignore[arg-type]
            apart = await asyncio.gather(worker.prepare(bad), worker.prepare(good), return_exceptions=True)
            return [*jobs, bad, good], [*together, *apart]

        jobs, errors = asyncio.run(prepared())
    finally:
        encoder.token_ids = real  # type: ignore[method-assign]
        worker.shutdown()
    assert calls[0] == 4  # the first three requests: one call for their four inputs
    assert errors[:3] == [None, None, None] and all(j.token_ids for j in jobs[:3])
    assert [len(j.token_ids or ()) for j in jobs[:3]] == [1, 2, 1]
    assert isinstance(errors[3], ValueError) and jobs[3].token_ids is None  # the refused one alone
    assert errors[4] is None and jobs[4].token_ids and len(jobs[4].token_ids) == 1
