"""Keeps this replica's caches in step with the store's writes, from any replica.

Two paths: the store's change feed (Redis pub/sub, or the SQLite change log) applies each write
within milliseconds; a version check every ``check_s`` seconds catches anything the feed lost
(pub/sub delivers at most once: a dropped connection loses messages silently). When the store's
counter went *backwards* the store was reset (e.g. a Redis without persistence restarted), and
versions may repeat, so both caches are emptied. A sharded store (Redis Cluster) has one counter
per slot group: each is tracked on its own (``seen`` maps shard -> version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from xpeft.server.cache import ProfileCache
from xpeft.server.errors import StoreUnavailable
from xpeft.server.metrics import Metrics
from xpeft.server.stores.base import ChangeEvent, ProfileStore

log = logging.getLogger("xpeft.server")


class CacheSync:
    """Applies change events to a :class:`ProfileCache`; run :meth:`run` as a background task."""

    def __init__(
        self, store: ProfileStore, cache: ProfileCache, metrics: Metrics, check_s: float = 1.0
    ) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.check_s = check_s
        self.seen: dict[str, int] = {}  # per counter: the highest store version this replica has applied
        self._unexplained: dict[str, int] = {}  # counters the feed had not explained at the last check

    async def run(self) -> None:
        await asyncio.gather(self._listen(), self._check_loop())

    async def apply(self, event: ChangeEvent) -> None:
        if event.id is None:
            await self._resync(event.counters(), "resync")
            return
        self.cache.invalidate(event.id, event.version)
        self.seen[event.shard] = max(self.seen.get(event.shard, 0), event.version)
        self.metrics.invalidations.labels("delete" if event.deleted else "put").inc()
        if event.published_at is not None:
            self.metrics.invalidation_lag.observe(max(0.0, time.time() - event.published_at))

    async def _listen(self) -> None:
        while True:
            try:
                async for event in self.store.watch():
                    try:
                        await self.apply(event)
                    except StoreUnavailable as exc:
                        log.warning("cache resync failed, the version check will retry: %s", exc.message)
            except StoreUnavailable as exc:
                log.warning("store change feed lost: %s", exc.message)
                await asyncio.sleep(0.5)

    async def _resync(
        self, store_seqs: dict[str, int], kind: str, seen_before: dict[str, int] | None = None
    ) -> None:
        """``seen_before``: ``self.seen`` as it was when ``store_seqs`` were read. Events applied while
        the store answered raise ``self.seen`` past a counter that was current when read; that is
        not a reset."""
        baseline = self.seen if seen_before is None else seen_before
        back = [s for s, seq in store_seqs.items() if seq < baseline.get(s, 0)]
        if back:
            log.warning(
                "store version went back from %d to %d: the store was reset, emptying caches",
                baseline[back[0]],
                store_seqs[back[0]],
            )
            self.cache.clear()
            self.metrics.invalidations.labels("reset").inc()
            self.seen = dict(store_seqs)
            return
        await self.cache.resync()
        self.metrics.invalidations.labels(kind).inc()
        for shard, seq in store_seqs.items():
            self.seen[shard] = max(self.seen.get(shard, 0), seq)

    async def check_once(self) -> None:
        """Resync when the store's counter stayed ahead of the feed for a whole interval."""
        seen_before = dict(self.seen)
        seqs = await self.metrics.timed_store("seq", self.store.current_seqs())
        missed = [s for s, seq in self._unexplained.items() if seq > self.seen.get(s, 0)]
        if any(seq < seen_before.get(s, 0) for s, seq in seqs.items()):
            await self._resync(seqs, "reset", seen_before)
        elif missed:
            log.info("change feed missed versions up to %d; resyncing", self._unexplained[missed[0]])
            await self._resync(seqs, "missed", seen_before)
        self._unexplained = {s: seq for s, seq in seqs.items() if seq > self.seen.get(s, 0)}

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            with contextlib.suppress(StoreUnavailable):  # counted in the store metrics; retried next time
                await self.check_once()
