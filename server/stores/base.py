"""The profile store contract that the Redis and the embedded SQLite store both fulfil.

Versions come from one store-wide counter, so they increase across puts *and* deletes of every
id: a profile deleted and uploaded again always gets a larger version than any copy a replica
may still hold, and an invalidation event ``(id, version)`` can be compared with any cache entry.
"""

from __future__ import annotations

import abc
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

from xpeft.server.errors import CorruptRecord, StoreUnavailable

__all__ = [
    "ChangeEvent",
    "CorruptRecord",
    "ProfileRecord",
    "ProfileStore",
    "StoreUnavailable",
    "StoredProfile",
    "iso",
    "load_meta",
    "readable_records",
]
log = logging.getLogger("xpeft.server")
R = TypeVar("R")


def load_meta(profile_id: str, raw: str | bytes | None) -> dict:
    """A stored metadata blob as a dict; :class:`CorruptRecord` when it is not a JSON object
    (a damaged or hand-edited record must cost that one id, never a whole listing)."""
    try:
        meta = json.loads(raw) if raw is not None else None
    except (ValueError, TypeError):
        meta = None
    if not isinstance(meta, dict):
        raise CorruptRecord(profile_id, "its stored metadata is not a JSON object")
    return meta


def readable_records(rows: Iterable[R], make: Callable[[R], ProfileRecord]) -> list[ProfileRecord]:
    """The records of a listing page, leaving out (and logging) those that cannot be read."""
    records = []
    for row in rows:
        try:
            records.append(make(row))
        except CorruptRecord as exc:
            log.error("listing leaves out profile %r: %s", exc.profile_id, exc.message)
    return records


@dataclass(frozen=True)
class ProfileRecord:
    """A profile's metadata as stored: what ``GET /profiles/{id}`` shows."""

    id: str
    version: int
    meta: dict = field(hash=False)
    created_at: float
    updated_at: float

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "version": self.version,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            **self.meta,
        }


@dataclass(frozen=True)
class StoredProfile(ProfileRecord):
    """Metadata plus the ``.xpm`` bytes, read together in one atomic operation."""

    data: bytes = b""


@dataclass(frozen=True)
class ChangeEvent:
    """One write seen by :meth:`ProfileStore.watch`.

    ``id is None`` means "events may have been missed" (first subscription, reconnect, pruned
    log): the listener must re-check every cached version against the store.
    """

    id: str | None
    version: int
    deleted: bool = False
    published_at: float | None = None


def iso(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def now() -> float:
    return time.time()


class ProfileStore(abc.ABC):
    """Profiles by id: ``.xpm`` bytes, metadata and a version, each write atomic."""

    kind: str = ""

    @abc.abstractmethod
    async def put(self, profile_id: str, data: bytes, meta: dict) -> tuple[ProfileRecord, bool]:
        """Store bytes and metadata under a new version; ``True`` when the id was new."""

    @abc.abstractmethod
    async def get(self, profile_id: str) -> StoredProfile | None:
        """Bytes, metadata and version of one consistent write, or ``None``."""

    @abc.abstractmethod
    async def get_record(self, profile_id: str) -> ProfileRecord | None:
        """Metadata and version only."""

    @abc.abstractmethod
    async def delete(self, profile_id: str) -> int | None:
        """Remove a profile; the version of the deletion, or ``None`` when it did not exist."""

    @abc.abstractmethod
    async def list(self, cursor: str | None, limit: int) -> tuple[list[ProfileRecord], str | None]:
        """Records with ids after ``cursor`` in id order; the next cursor, or ``None`` at the end."""

    @abc.abstractmethod
    async def versions(self, profile_ids: Iterable[str]) -> dict[str, int]:
        """Current versions of the ids that exist (absent ids are left out)."""

    @abc.abstractmethod
    async def current_seq(self) -> int:
        """The store-wide counter: the version of the latest write."""

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[ChangeEvent]:
        """Every write from any process, in order, starting with a resync event (``id=None``)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""
