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
from collections.abc import Callable
from dataclasses import dataclass

from xpeft.adapters.fusion import FusedAdapters
from xpeft.profiles.profile import Profile
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
    """Fused adapter weights on the model's device, least recently used first out, bounded in bytes.

    Used by the model worker thread and invalidated from the event loop, hence the lock.
    """

    def __init__(self, capacity_bytes: int, floors: VersionFloors, metrics: Metrics | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.floors = floors
        self.metrics = metrics
        self._entries: OrderedDict[CacheKey, FusedAdapters] = OrderedDict()
        self._versions: dict[str, set[int]] = {}
        self._nbytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey) -> FusedAdapters | None:
        with self._lock:
            fused = self._entries.get(key)
            if fused is not None:
                self._entries.move_to_end(key)
        self._count("hit" if fused is not None else "miss")
        return fused

    def put(self, key: CacheKey, fused: FusedAdapters) -> bool:
        """Keep ``fused`` unless it is stale or alone larger than the whole cache."""
        size = fused.nbytes
        if size > self.capacity_bytes:
            return False
        evicted = 0
        with self._lock:
            # checked under the lock: an invalidation raises the floor, then drops under this lock
            if key[1] < self.floors.get(key[0]):
                return False
            if key in self._entries:
                return True
            while self._entries and self._nbytes + size > self.capacity_bytes:
                self._remove(next(iter(self._entries)))
                evicted += 1
            self._entries[key] = fused
            self._versions.setdefault(key[0], set()).add(key[1])
            self._nbytes += size
        self._count("eviction", evicted)
        self._gauge()
        return True

    def drop(self, profile_id: str, below: int | None = None) -> int:
        """Remove the entries of ``profile_id`` (only versions under ``below`` when given)."""
        with self._lock:
            versions = [v for v in self._versions.get(profile_id, ()) if below is None or v < below]
            for v in versions:
                self._remove((profile_id, v))
        self._gauge()
        return len(versions)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._versions.clear()
            self._nbytes = 0
        self._gauge()

    def _remove(self, key: CacheKey) -> None:
        fused = self._entries.pop(key)
        self._nbytes -= fused.nbytes
        versions = self._versions[key[0]]
        versions.discard(key[1])
        if not versions:
            del self._versions[key[0]]

    def _count(self, event: str, count: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.cache_event("fused", event, count)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.fused_bytes.set(self._nbytes)
            self.metrics.cache_entries.labels("fused").set(len(self._entries))


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
