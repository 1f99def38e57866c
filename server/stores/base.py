"""The profile store contract that the Redis and the embedded SQLite store both fulfil.

Versions come from one store-wide counter, so they increase across puts *and* deletes of every
id: a profile deleted and uploaded again always gets a larger version than any copy a replica
may still hold, and an invalidation event ``(id, version)`` can be compared with any cache entry.

Writes may be conditional (:class:`Condition`, HTTP ``If-Match`` / ``If-None-Match: *``): the check
and the write are one atomic step, and a failed check raises :class:`PreconditionFailed` having
written nothing. A put of the bytes and metadata already stored writes nothing either: it answers
the current record with ``unchanged=True``, takes no version and publishes no event.
"""

from __future__ import annotations

import abc
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple, TypeVar

from xpeft.profiles.text import clean_strings
from xpeft.server.errors import CorruptRecord, PreconditionFailed, StoreUnavailable

__all__ = [
    "ChangeEvent",
    "Condition",
    "CorruptRecord",
    "PreconditionFailed",
    "PutResult",
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
    if not clean_strings(meta):  # written before the text rule, or by hand: it cannot be shown
        raise CorruptRecord(profile_id, "its stored metadata holds a string that is not text")
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
    log): the listener must re-check every cached version against the store. ``shard`` names the
    counter ``version`` came from (``""``: the one store-wide counter; the cluster store has one
    per slot group); a resync event of a sharded store carries every counter in ``seqs``.
    """

    id: str | None
    version: int
    deleted: bool = False
    published_at: float | None = None
    shard: str = ""
    seqs: dict[str, int] | None = field(default=None, hash=False, compare=False)

    def counters(self) -> dict[str, int]:
        """The counters a resync event read: ``{shard: version}`` unless it carries ``seqs``."""
        return dict(self.seqs) if self.seqs is not None else {self.shard: self.version}


@dataclass(frozen=True)
class Condition:
    """What a conditional write requires of the id's current version (checked atomically with it).

    ``versions``: the current version must be one of these (``If-Match: "17", "18"``; an empty set
    never holds). ``exists``: ``True`` the id must exist (``If-Match: *``), ``False`` it must not
    (``If-None-Match: *``, create only).
    """

    versions: frozenset[int] | None = None
    exists: bool | None = None

    def holds(self, current: int | None) -> bool:
        if self.exists is not None and (current is not None) != self.exists:
            return False
        return self.versions is None or current in self.versions

    def failure(self, profile_id: str, current: int | None) -> PreconditionFailed:
        """The refusal to raise when :meth:`holds` said no."""
        if current is None:
            why = "it does not exist"
        elif self.exists is False:
            why = f"it already exists (version {current})"
        else:
            why = f"its current version is {current}"
        return PreconditionFailed(profile_id, current, f"profile {profile_id!r} was not changed: {why}")


def check(condition: Condition | None, profile_id: str, current: int | None) -> None:
    """Raise :class:`PreconditionFailed` unless ``condition`` (if any) holds for ``current``."""
    if condition is not None and not condition.holds(current):
        raise condition.failure(profile_id, current)


class PutResult(NamedTuple):
    """What a put did: the stored record, whether the id was new, and whether nothing changed
    (the same bytes and metadata were stored already: no new version, no event)."""

    record: ProfileRecord
    created: bool
    unchanged: bool = False


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
    async def put(
        self, profile_id: str, data: bytes, meta: dict, condition: Condition | None = None
    ) -> PutResult:
        """Store bytes and metadata under a new version, unless they are stored already (then
        ``unchanged``); raises :class:`PreconditionFailed` when ``condition`` does not hold."""

    @abc.abstractmethod
    async def get(self, profile_id: str) -> StoredProfile | None:
        """Bytes, metadata and version of one consistent write, or ``None``."""

    @abc.abstractmethod
    async def get_record(self, profile_id: str) -> ProfileRecord | None:
        """Metadata and version only."""

    @abc.abstractmethod
    async def delete(self, profile_id: str, condition: Condition | None = None) -> int | None:
        """Remove a profile; the version of the deletion, or ``None`` when it did not exist (whatever
        ``condition`` says); raises :class:`PreconditionFailed` when it exists and ``condition`` fails."""

    @abc.abstractmethod
    async def list(self, cursor: str | None, limit: int) -> tuple[list[ProfileRecord], str | None]:
        """Records with ids after ``cursor`` in id order; the next cursor, or ``None`` at the end."""

    @abc.abstractmethod
    async def versions(self, profile_ids: Iterable[str]) -> dict[str, int]:
        """Current versions of the ids that exist (absent ids are left out)."""

    @abc.abstractmethod
    async def current_seq(self) -> int:
        """The store-wide counter: the version of the latest write."""

    async def current_seqs(self) -> dict[str, int]:
        """Every version counter by shard (one, ``""``, unless the store is sharded): what the
        replicas' version check compares with the events it has seen, counter by counter."""
        return {"": await self.current_seq()}

    @abc.abstractmethod
    def watch(self) -> AsyncIterator[ChangeEvent]:
        """Every write from any process, in order, starting with a resync event (``id=None``)."""

    @abc.abstractmethod
    async def ping(self) -> dict[str, object] | None:
        """Raise :class:`StoreUnavailable` unless the store answers; optionally the store's own
        state for ``/readyz`` (the cluster store: ``CLUSTER INFO``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads."""
