"""Keeps this replica's caches in step with the store's writes, from any replica.

Two paths: the store's change feed (Redis pub/sub, or the SQLite change log) applies each write
within milliseconds; a version check every ``check_s`` seconds catches anything the feed lost
(pub/sub delivers at most once: a dropped connection loses messages silently). When the store's
counter went *backwards* the store was reset (e.g. a Redis without persistence restarted), and
versions may repeat, so both caches are emptied.
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
        self.seen = 0  # the highest store version this replica has applied
        self._unexplained: int | None = None  # a counter value the feed had not explained at the last check

    async def run(self) -> None:
        await asyncio.gather(self._listen(), self._check_loop())

    async def apply(self, event: ChangeEvent) -> None:
        if event.id is None:
            await self._resync(event.version, "resync")
            return
        self.cache.invalidate(event.id, event.version)
        self.seen = max(self.seen, event.version)
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

    async def _resync(self, store_seq: int, kind: str, seen_before: int | None = None) -> None:
        """``seen_before``: ``self.seen`` as it was when ``store_seq`` was read. Events applied while
        the store answered raise ``self.seen`` past a counter that was current when read; that is
        not a reset."""
        baseline = self.seen if seen_before is None else seen_before
        if store_seq < baseline:
            log.warning(
                "store version went back from %d to %d: the store was reset, emptying caches",
                baseline,
                store_seq,
            )
            self.cache.clear()
            self.metrics.invalidations.labels("reset").inc()
            self.seen = store_seq
            return
        await self.cache.resync()
        self.metrics.invalidations.labels(kind).inc()
        self.seen = max(self.seen, store_seq)

    async def check_once(self) -> None:
        """Resync when the store's counter stayed ahead of the feed for a whole interval."""
        seen_before = self.seen
        seq = await self.metrics.timed_store("seq", self.store.current_seq())
        if seq < seen_before:
            await self._resync(seq, "reset", seen_before)
        elif self._unexplained is not None and self._unexplained > self.seen:
            log.info("change feed missed versions up to %d; resyncing", self._unexplained)
            await self._resync(seq, "missed", seen_before)
        self._unexplained = seq if seq > self.seen else None

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            with contextlib.suppress(StoreUnavailable):  # counted in the store metrics; retried next time
                await self.check_once()
