"""The fused-weight slot pool under the server's races: eviction while a batch is assembled,
invalidation while a batch runs, more profiles than slots, replaced profiles never served again."""

from __future__ import annotations

import threading

import pytest
import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.batcher import Job
from xpeft.engine.cache import CachedProfile, FusedCache, VersionFloors
from xpeft.engine.runtime import MultiProfileModel
from xpeft.engine.slots import slot_nbytes
from xpeft.engine.worker import ModelWorker
from xpeft.profiles import format as xpm
from xpeft.server.cache import ProfileCache
from xpeft.server.metrics import Metrics


def make_worker(model: MultiProfileModel, slots: int) -> tuple[ModelWorker, Metrics]:
    bank = model.bank
    size = slot_nbytes(bank.num_layers, bank.hidden_size, bank.bottleneck, model.encoder.dtype)
    metrics = Metrics()
    worker = ModelWorker(
        FusedCache(slots * size + size // 2, VersionFloors(), metrics.engine()), metrics.engine()
    )
    worker.attach(model)
    assert worker.fused_cache.num_slots == slots
    return worker, metrics


def entries(bank, profile_bytes, n: int, version: int = 1) -> list[CachedProfile]:
    return [CachedProfile(f"p{i}", version, xpm.decode(profile_bytes(100 + i), bank)) for i in range(n)]


def check(model: MultiProfileModel, jobs: list[Job], answers) -> None:
    for job, got in zip(jobs, answers, strict=True):
        want = model.predict(job.entry.profile, job.inputs)
        assert [g.label for g in got] == [w.label for w in want]
        assert [g.score for g in got] == pytest.approx([w.score for w in want], abs=1e-5)


def test_a_batch_with_more_profiles_than_slots_is_still_right(encoder, bank, profile_bytes) -> None:
    model = MultiProfileModel(encoder, bank)
    worker, metrics = make_worker(model, slots=2)
    ps = entries(bank, profile_bytes, 4)
    first = [Job(ps[0], ["warm one"], None)]  # type: ignore[arg-type]
    worker.run(first)
    # p0 is warm; p1 gets the free slot; p2 and p3 find every slot pinned by this very batch
    jobs = [Job(p, [f"text {i}", "again"], None) for i, p in enumerate(ps)]  # type: ignore[arg-type]
    check(model, jobs, worker.run(jobs))
    cache = worker.fused_cache
    assert ("p0", 1) in cache and ("p1", 1) in cache and len(cache) == 2
    assert cache.pool is not None and cache.pool.free_slots == 0
    assert not any(cache.pool.pinned(s) for s in range(2))  # every pin released after the batch
    # the next batch evicts the least recent slots and is right too
    later = [Job(ps[3], ["later"], None), Job(ps[2], ["x"], None)]  # type: ignore[arg-type]
    check(model, later, worker.run(later))
    assert ("p3", 1) in cache and ("p2", 1) in cache
    assert metrics.registry.get_sample_value("xpeft_fused_profiles_total") == 1 + 3 + 2
    worker.shutdown()


def test_invalidation_during_a_batch_neither_breaks_it_nor_is_cached(encoder, bank, profile_bytes) -> None:
    model = MultiProfileModel(encoder, bank)
    worker, _ = make_worker(model, slots=2)
    metrics = Metrics()
    profiles = ProfileCache(None, lambda b: xpm.decode(b, bank), 10, worker.fused_cache, metrics)  # type: ignore[arg-type]
    old, other = entries(bank, profile_bytes, 2)
    worker.run([Job(other, ["warm"], None)])  # type: ignore[arg-type]
    other_slot = worker.fused_cache.pool.find(other.key)  # type: ignore[union-attr]
    real = model.fuse_into_pool
    seen: list[int] = []

    def fuse_then_invalidate(pool, slots, ps):  # a PUT's event arrives from the event loop mid-batch
        real(pool, slots, ps)
        seen.extend(slots)
        t = threading.Thread(target=profiles.invalidate, args=(old.id, old.version + 1))
        t.start()
        t.join()
        # the dropped profile's slot and the batch's warm slot stay pinned: no claim may take them
        assert worker.fused_cache.pool.claim()[0] is None  # type: ignore[union-attr]

    model.fuse_into_pool = fuse_then_invalidate  # type: ignore[method-assign]
    jobs = [Job(old, ["served with the version it was read at"], None), Job(other, ["b"], None)]  # type: ignore[arg-type]
    check(model, jobs, worker.run(jobs))
    model.fuse_into_pool = real  # type: ignore[method-assign]
    cache = worker.fused_cache
    assert old.key not in cache and other.key in cache  # fused for the batch, refused by the floor
    assert cache.pool is not None and cache.pool.free_slots == 1  # freed after the batch ran
    assert cache.pool.find(other.key) == other_slot and seen != [other_slot]
    # a late batch still holding the old version fuses it again but never keeps it
    worker.run([Job(old, ["late"], None)])  # type: ignore[arg-type]
    assert old.key not in cache
    worker.shutdown()


def test_a_replaced_profiles_slot_is_never_served_again(encoder, bank, profile_bytes) -> None:
    model = MultiProfileModel(encoder, bank)
    worker, _ = make_worker(model, slots=3)
    floors = worker.fused_cache.floors
    v1 = CachedProfile("p", 1, xpm.decode(profile_bytes(1), bank))
    v2 = CachedProfile("p", 2, xpm.decode(profile_bytes(2), bank))
    worker.run([Job(v1, ["x"], None)])  # type: ignore[arg-type]
    floors.raise_to("p", 2)
    worker.fused_cache.drop("p", below=2)
    calls = []
    real = model.fuse_into_pool
    model.fuse_into_pool = lambda pool, slots, ps: calls.append(ps) or real(pool, slots, ps)  # type: ignore[method-assign]
    jobs = [Job(v2, ["x", "y"], None)]  # type: ignore[arg-type]
    check(model, jobs, worker.run(jobs))
    assert calls and calls[0] == [v2.profile]  # v2 was fused, not read from v1's slot
    assert ("p", 2) in worker.fused_cache and ("p", 1) not in worker.fused_cache
    worker.shutdown()


def test_eviction_never_overwrites_a_slot_reserved_by_a_batch_being_assembled(keep) -> None:
    """Reservation level: slots handed to a batch keep their contents until it releases them."""

    def fused_entry() -> FusedAdapters:
        return FusedAdapters.zeros(2, 8, 4)

    size = fused_entry().nbytes
    cache = FusedCache(2 * size, VersionFloors())
    a = fused_entry()
    a.down.fill_(1.0)
    assert keep(cache, ("a", 1), a) and keep(cache, ("b", 1), fused_entry())
    held = cache.reserve([("a", 1)])  # a batch assembled around "a" ...
    assert held.slots[0] is not None and held.cold == []
    assert keep(cache, ("c", 1), fused_entry())  # ... so "b" is evicted, not "a"
    assert ("a", 1) in cache and ("b", 1) not in cache
    assert keep(cache, ("d", 1), fused_entry())  # "c" goes, "a" stays: it is pinned
    assert ("a", 1) in cache and ("c", 1) not in cache
    cache.drop("a")  # invalidated while the batch still reads it
    assert ("a", 1) not in cache and keep(cache, ("e", 1), fused_entry())  # takes "d"'s slot, not "a"'s
    assert ("d", 1) not in cache
    assert torch.equal(cache.pool.view(held.slots[0]).down, a.down)  # type: ignore[union-attr, arg-type]
    assert cache.pool.free_slots == 0  # type: ignore[union-attr]
    held.release()
    assert cache.pool.free_slots == 1  # type: ignore[union-attr]
    assert keep(cache, ("f", 1), fused_entry()) and ("e", 1) in cache  # the freed slot, no eviction


def test_without_room_for_one_slot_every_batch_is_fused_for_itself(encoder, bank, profile_bytes) -> None:
    model = MultiProfileModel(encoder, bank)
    metrics = Metrics()
    worker = ModelWorker(
        FusedCache(0, VersionFloors(), metrics.engine()), metrics.engine()
    )  # XPEFT_FUSED_CACHE_BYTES=0
    worker.attach(model)
    assert worker.fused_cache.pool is None and worker.fused_cache.num_slots == 0
    jobs = [Job(p, ["a text", "another"], None) for p in entries(bank, profile_bytes, 3)]  # type: ignore[arg-type]
    check(model, jobs, worker.run(jobs))
    check(model, jobs, worker.run(jobs))
    assert (
        len(worker.fused_cache) == 0 and metrics.registry.get_sample_value("xpeft_fused_profiles_total") == 6
    )
    worker.shutdown()


def test_cuda_graphs_asked_for_without_cuda_are_refused(encoder, bank) -> None:
    model = MultiProfileModel(encoder, bank)
    worker, _ = make_worker(model, slots=1)
    with pytest.raises(ValueError, match="cuda_graphs is on"):
        worker.attach(model, cuda_graphs=True)
    worker.attach(model, cuda_graphs=False)
    assert model.graphs is None
    worker.shutdown()
