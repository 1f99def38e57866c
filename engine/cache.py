"""The fused-weight cache on the model's device: the slot pool, its reservations and version floors.

Keyed by ``(profile id, version)``. A shared :class:`VersionFloors` remembers, per id, the newest
version that any change event announced; a copy older than its floor is neither served nor kept.
That closes the race where a slow fusion of version 1 finishes after the event for version 2 has
already been applied: it is used by its batch and thrown away. The server's host cache of decoded
profiles (``xpeft.server.cache.ProfileCache``) shares the floors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from xpeft.adapters.fusion import FusedAdapters
from xpeft.engine.metrics import EngineMetrics
from xpeft.engine.runtime import MultiProfileModel, SlotBatch
from xpeft.engine.slots import DEFAULT_HEAD_BYTES, SlotPool, slot_nbytes
from xpeft.profiles.profile import Profile

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
        metrics: EngineMetrics | None = None,
        head_bytes: int = DEFAULT_HEAD_BYTES,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.head_bytes = head_bytes
        self.floors = floors
        self.metrics = metrics or EngineMetrics()
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
        if count:
            self.metrics.cache_event(event, count)

    def _gauge(self) -> None:
        self.metrics.pool_used(self.nbytes, len(self))


@dataclass
class Reservation:
    """A batch's hold on its slots, from assembly until it ran (use as a context manager).

    ``slots[i]`` is the slot of ``keys[i]`` (``None``: no slot was free; the batch then runs on a
    transient pool);
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

    def fill(self, model: MultiProfileModel, profiles: Sequence[Profile]) -> SlotBatch:
        """Fuse the cold ``profiles[i]`` (``keys[i]``'s) into their slots, weights and heads, and
        commit them; the batch's weights as its slots in the pool. When some profile got no slot
        (more distinct profiles than free slots, or no pool at all), the batch runs on a transient
        pool of its own profiles instead (:meth:`MultiProfileModel.transient_batch`); the cold ones
        that got a slot are still kept for later batches."""
        pool = self.cache.pool
        slotted = {i: s for i in self.cold if (s := self.slots[i]) is not None}
        if slotted and pool is not None:
            model.fuse_into_pool(pool, list(slotted.values()), [profiles[i] for i in slotted])
            for i in slotted:
                self.commit(i)
        if pool is not None and self.complete:
            return SlotBatch(pool, cast(list[int], self.slots))
        return model.transient_batch(profiles)

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
