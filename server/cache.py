"""The host cache of decoded profiles in front of the store, keyed by version.

It shares the engine's :class:`~xpeft.engine.cache.VersionFloors` with the fused-weight cache on
the device (:mod:`xpeft.engine.cache`): a copy older than its id's floor is neither served nor
(re)inserted, so a slow load of version 1 that finishes after the event for version 2 is thrown
away and read again instead of being cached for good.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from xpeft.engine.cache import CachedProfile, FusedCache
from xpeft.profiles.profile import Profile
from xpeft.server.metrics import Metrics
from xpeft.server.stores.base import ProfileStore

__all__ = ["PROFILE_OVERHEAD_BYTES", "ProfileCache"]

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
