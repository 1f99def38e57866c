"""The two caches in front of the store: decoded profiles (host) and fused weights (device).

Both are keyed by version. A shared :class:`VersionFloors` remembers, per id, the newest version
that any change event announced; a copy older than its floor is neither served nor (re)inserted.
That closes the race where a slow load of version 1 finishes after the event for version 2 has
already been applied: it is thrown away and read again instead of being cached for good.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles.profile import Profile
from xpeft.profiles.runtime import MultiProfileModel, SlotBatch
from xpeft.profiles.slots import DEFAULT_HEAD_BYTES, SlotPool, slot_nbytes
from xpeft.server.metrics import Metrics
from xpeft.server.stores.base import ProfileStore

CacheKey = tuple[str, int]  # (profile id, version)


@dataclass(frozen=True, eq=False)
class CachedProfile:
    """One decoded version of one profile; a request holds it from lookup to answer."""

    id: str
    version: int
    profile: Profile

    @property
    def key(self) -> CacheKey:
        return (self.id, self.version)


class VersionFloors:
    """Per id, the lowest version that may still be served (thread-safe, bounded)."""

    def __init__(self, max_ids: int = 1_000_000) -> None:
        self._floors: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_ids = max_ids

    def raise_to(self, profile_id: str, version: int) -> None:
        with self._lock:
            if version > self._floors.get(profile_id, 0):
                self._floors[profile_id] = version
                self._floors.move_to_end(profile_id)
                while len(self._floors) > self._max_ids:
                    self._floors.popitem(last=False)

    def get(self, profile_id: str) -> int:
        with self._lock:
            return self._floors.get(profile_id, 0)

    def clear(self) -> None:
        with self._lock:
            self._floors.clear()


class FusedCache:
    """Fused adapter weights on the model's device: a :class:`SlotPool` sized from the byte budget.

    The pool is allocated once, when the model is known (:meth:`attach`, or the first :meth:`put`),
    with ``capacity_bytes // slot_bytes`` slots. A batch reserves its profiles' slots
    (:meth:`reserve`): hits are pinned, cold profiles get a pinned free or least recently used slot
    and are fused straight into it, then committed under their key unless an invalidation raised
    the version floor meanwhile. Pins hold until the batch ran, so an eviction or an invalidation
    never overwrites a slot under a batch that reads it. Used by the model worker thread and
    invalidated from the event loop, hence the lock.
    """

    def __init__(
        self,
        capacity_bytes: int,
        floors: VersionFloors,
        metrics: Metrics | None = None,
        head_bytes: int = DEFAULT_HEAD_BYTES,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.head_bytes = head_bytes
        self.floors = floors
        self.metrics = metrics
        self.pool: SlotPool | None = None
        self._lock = threading.Lock()

    def attach(
        self,
        num_layers: int,
        hidden_size: int,
        bottleneck: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> SlotPool | None:
        """Allocate the pool for this shape (once); ``None`` when not even one slot fits the budget."""
        with self._lock:
            if self.pool is not None:
                if self.pool.shape != (num_layers, hidden_size, bottleneck):
                    raise ValueError(
                        f"the pool holds {self.pool.shape} adapters, not {(num_layers, hidden_size, bottleneck)}"
                    )
                return self.pool
            slots = self.capacity_bytes // slot_nbytes(num_layers, hidden_size, bottleneck, dtype)
            if slots < 1:
                return None
            self.pool = SlotPool(slots, num_layers, hidden_size, bottleneck, device, dtype, self.head_bytes)
        self._gauge()
        return self.pool

    @property
    def num_slots(self) -> int:
        return 0 if self.pool is None else self.pool.num_slots

    @property
    def nbytes(self) -> int:
        """Bytes of the slots in use (the pool itself is allocated whole)."""
        return 0 if self.pool is None else len(self.pool) * self.pool.slot_bytes

    def __len__(self) -> int:
        return 0 if self.pool is None else len(self.pool)

    def __contains__(self, key: CacheKey) -> bool:
        return self.pool is not None and key in self.pool

    def get(self, key: CacheKey) -> FusedAdapters | None:
        """The cached weights of ``key`` as a view of its slot (valid until the slot is reused)."""
        with self._lock:
            slot = None if self.pool is None else self.pool.find(key)
            fused = None if slot is None or self.pool is None else self.pool.view(slot)
        self._count("hit" if fused is not None else "miss")
        return fused

    def reserve(self, keys: Sequence[CacheKey]) -> Reservation:
        """Pin the slots of a batch's profiles: hits where cached, fresh slots for the cold ones."""
        reservation = Reservation(self, list(keys))
        if self.pool is None:
            reservation.slots = [None] * len(keys)
            reservation.cold = list(range(len(keys)))
            self._count("miss", len(keys))
            return reservation
        evicted = 0
        hits = 0
        with self._lock:
            pool = self.pool
            for key in keys:
                slot = pool.find(key)
                if slot is not None:
                    pool.pin(slot)
                    hits += 1
                reservation.slots.append(slot)
            for i, slot in enumerate(reservation.slots):
                if slot is None:
                    reservation.cold.append(i)
                    fresh, gone = pool.claim()
                    evicted += len(gone)
                    reservation.slots[i] = fresh
        self._count("hit", hits)
        self._count("miss", len(reservation.cold))
        self._count("eviction", evicted)
        return reservation

    def drop(self, profile_id: str, below: int | None = None) -> int:
        """Forget the slots of ``profile_id`` (only versions under ``below`` when given)."""
        if self.pool is None:
            return 0
        with self._lock:
            owned = [cast(CacheKey, k) for k in self.pool.registered()]
            keys = [k for k in owned if k[0] == profile_id and (below is None or k[1] < below)]
            for key in keys:
                self.pool.drop(key)
        self._gauge()
        return len(keys)

    def clear(self) -> None:
        if self.pool is not None:
            with self._lock:
                self.pool.clear()
        self._gauge()

    def _commit(self, key: CacheKey, slot: int) -> bool:
        assert self.pool is not None
        with self._lock:
            if key[1] < self.floors.get(key[0]) or key in self.pool:
                return False  # replaced or deleted while it was fused: used by this batch, never kept
            self.pool.commit(key, slot)
        self._gauge()
        return True

    def _release(self, slots: Sequence[int]) -> None:
        if self.pool is None:
            return
        with self._lock:
            for slot in slots:
                self.pool.unpin(slot)

    def _count(self, event: str, count: int = 1) -> None:
        if self.metrics is not None and count:
            self.metrics.cache_event("fused", event, count)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.fused_bytes.set(self.nbytes)
            self.metrics.cache_entries.labels("fused").set(len(self))


@dataclass
class Reservation:
    """A batch's hold on its slots, from assembly until it ran (use as a context manager).

    ``slots[i]`` is the slot of ``keys[i]`` (``None``: no slot was free, fuse it outside the pool);
    ``cold`` lists the indices that :meth:`fill` fuses before the batch runs. The reservation is
    the one writer of the slot pool: it fuses the cold profiles into their slots and keeps each
    one that no newer version replaced meanwhile (the version floor, checked as it commits).
    """

    cache: FusedCache
    keys: list[CacheKey]
    slots: list[int | None] = field(default_factory=list)
    cold: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(s is not None for s in self.slots)

    def fill(self, model: MultiProfileModel, profiles: Sequence[Profile]) -> list[FusedAdapters] | SlotBatch:
        """Fuse the cold ``profiles[i]`` (``keys[i]``'s) into their slots, weights and heads, and
        commit them; the batch's weights as its slots in the pool, or, when some profile got no
        slot, one ``U=1`` entry each (those fused for this batch only)."""
        pool = self.cache.pool
        slotted = {i: s for i in self.cold if (s := self.slots[i]) is not None}
        if slotted and pool is not None:
            model.fuse_into_pool(pool, list(slotted.values()), [profiles[i] for i in slotted])
            for i in slotted:
                self.commit(i)
        if pool is not None and self.complete:
            return SlotBatch(pool, cast(list[int], self.slots))
        # more distinct profiles than free slots: the rest are fused for this batch only
        outside = [i for i, s in enumerate(self.slots) if s is None]
        extra = dict(zip(outside, model.fuse([profiles[i] for i in outside]), strict=True))
        return [extra[i] if s is None else pool.view(s) for i, s in enumerate(self.slots)]  # type: ignore[union-attr]

    def commit(self, index: int) -> bool:
        """The cold profile ``keys[index]`` was fused into its slot: keep it for later batches."""
        slot = self.slots[index]
        return slot is not None and self.cache._commit(self.keys[index], slot)

    def release(self) -> None:
        self.cache._release([s for s in self.slots if s is not None])
        self.slots = []

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# Python objects around a decoded profile's tensors (dataclass, dicts, tensor headers, labels).
PROFILE_OVERHEAD_BYTES = 4096


class ProfileCache:
    """Decoded profiles by id (host memory, LRU), loaded once however many ask at once.

    Bounded by count *and* by bytes: a hard profile decodes to a few KB, a ``single_adapter``
    profile to most of a megabyte, so a count alone would not bound memory.
    """

    def __init__(
        self,
        store: ProfileStore,
        decode: Callable[[bytes], Profile],
        max_profiles: int,
        fused: FusedCache,
        metrics: Metrics,
        max_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.decode = decode
        self.max_profiles = max_profiles
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.fused = fused
        self.floors = fused.floors
        self.metrics = metrics
        self._entries: OrderedDict[str, CachedProfile] = OrderedDict()
        self._loading: dict[str, asyncio.Future[CachedProfile | None]] = {}  # one read per id at a time

    def __len__(self) -> int:
        return len(self._entries)

    def cached_version(self, profile_id: str) -> int | None:
        entry = self._entries.get(profile_id)
        return None if entry is None else entry.version

    async def get(self, profile_id: str) -> CachedProfile | None:
        """The newest known version of a profile, or ``None`` when the store has no such id."""
        entry = self._entries.get(profile_id)
        if entry is not None and entry.version >= self.floors.get(profile_id):
            self._entries.move_to_end(profile_id)
            self.metrics.cache_event("profile", "hit")
            return entry
        self.metrics.cache_event("profile", "miss")
        pending = self._loading.get(profile_id)
        if pending is None:
            # A task of its own: a caller that times out (or disconnects) must not cancel the read
            # that the other callers of the same id are waiting for.
            pending = asyncio.ensure_future(self._load(profile_id))
            self._loading[profile_id] = pending
            pending.add_done_callback(lambda task: self._loaded(profile_id, task))
        return await asyncio.shield(pending)

    def _loaded(self, profile_id: str, task: asyncio.Future[CachedProfile | None]) -> None:
        if self._loading.get(profile_id) is task:
            del self._loading[profile_id]
        if not task.cancelled():
            task.exception()  # retrieved: the waiters re-raise it; nobody else must log it

    async def _load(self, profile_id: str) -> CachedProfile | None:
        for _ in range(5):
            stored = await self.metrics.timed_store("get", self.store.get(profile_id))
            if stored is None:
                return None
            profile = await asyncio.to_thread(self.decode, stored.data)
            entry = CachedProfile(profile_id, stored.version, profile)
            if stored.version >= self.floors.get(profile_id):
                self._insert(entry)
                return entry
            # a newer version was announced while this one loaded: read again
        return entry  # still racing with writers after 5 reads: serve, but do not cache, the last one

    @staticmethod
    def _size(entry: CachedProfile) -> int:
        return entry.profile.nbytes + PROFILE_OVERHEAD_BYTES

    def _pop(self, profile_id: str) -> CachedProfile | None:
        entry = self._entries.pop(profile_id, None)
        if entry is not None:
            self.nbytes -= self._size(entry)
        return entry

    def _over(self) -> bool:
        return len(self._entries) > self.max_profiles or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        )

    def _insert(self, entry: CachedProfile) -> None:
        self._pop(entry.id)
        self._entries[entry.id] = entry
        self.nbytes += self._size(entry)
        evicted = 0
        while len(self._entries) > 1 and self._over():  # the entry just loaded always stays
            old_id = next(iter(self._entries))
            self._pop(old_id)
            self.fused.drop(old_id)
            evicted += 1
        self.metrics.cache_event("profile", "eviction", evicted)
        self.metrics.cache_entries.labels("profile").set(len(self._entries))

    def invalidate(self, profile_id: str, version: int) -> bool:
        """A write of ``version`` happened: drop every older copy of the profile, here and on the device."""
        self.floors.raise_to(profile_id, version)
        entry = self._entries.get(profile_id)
        dropped = entry is not None and entry.version < version
        if dropped:
            self._pop(profile_id)
            self.metrics.cache_entries.labels("profile").set(len(self._entries))
        self.fused.drop(profile_id, below=version)
        return dropped

    async def resync(self) -> int:
        """Compare every cached version with the store; drop the stale ones. Returns how many."""
        ids = list(self._entries)
        current = await self.metrics.timed_store("versions", self.store.versions(ids))
        dropped = 0
        for profile_id in ids:
            entry = self._entries.get(profile_id)
            version = current.get(profile_id)
            if entry is None:
                continue
            if version is None or version != entry.version:
                # deleted, or changed: anything up to the cached version is stale
                self.invalidate(profile_id, max(entry.version + 1, version or 0))
                dropped += 1
        return dropped

    def clear(self) -> None:
        """Forget everything, floors included (the store itself was reset)."""
        self._entries.clear()
        self.nbytes = 0
        self.fused.clear()
        self.floors.clear()
        self.metrics.cache_entries.labels("profile").set(0)
