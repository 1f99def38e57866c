"""The embedded store: one SQLite file (standard library), so ``xpeft serve`` needs no server.

All SQL runs on one dedicated thread with one connection, so the event loop never blocks and
the connection is never shared between threads. Every write appends a row to ``changes``; its
row id is the store-wide version. ``watch`` polls that table, which also makes several processes
sharing one file (WAL mode) see each other's writes within a poll interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from xpeft.server.stores.base import (
    ChangeEvent,
    Condition,
    ProfileRecord,
    ProfileStore,
    PutResult,
    StoredProfile,
    StoreUnavailable,
    check,
    load_meta,
    now,
    readable_records,
)

T = TypeVar("T")
log = logging.getLogger("xpeft.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data BLOB NOT NULL,
    meta TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    at REAL NOT NULL
);
"""
_RECORD_COLUMNS = "id, version, meta, created_at, updated_at"


class SQLiteStore(ProfileStore):
    """Profiles in a local SQLite file; see the module docstring for the threading model."""

    kind = "sqlite"

    def __init__(
        self, path: str | Path, poll_s: float = 0.1, keep_changes: int = 10_000, timeout_s: float = 5.0
    ) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.keep_changes = keep_changes
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xpeft-sqlite")
        self._conn: sqlite3.Connection | None = None
        try:
            self._executor.submit(self._open).result()
        except (sqlite3.Error, OSError) as exc:
            self._executor.shutdown(wait=False)
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc

    # -- thread side -----------------------------------------------------------------------
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only: the file holds every tenant's profiles. SQLite gives its -wal and -shm files
        # the database file's mode. An existing file keeps its mode (the operator chose it) but a
        # world-readable one is reported.
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif self.path.stat().st_mode & stat.S_IROTH:
            log.warning("the SQLite store %s is world-readable: chmod 600 it", self.path)
        conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("store is closed")
        return self._conn

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one IMMEDIATE transaction: all of it is stored, or none of it."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise StoreUnavailable(f"SQLite store at {self.path}: {exc}") from exc

    @staticmethod
    def _record(row: tuple) -> ProfileRecord:
        return ProfileRecord(
            id=row[0], version=row[1], meta=load_meta(row[0], row[2]), created_at=row[3], updated_at=row[4]
        )

    # -- contract --------------------------------------------------------------------------
    async def put(
        self, profile_id: str, data: bytes, meta: dict, condition: Condition | None = None
    ) -> PutResult:
        stamp = now()
        meta_json = json.dumps(meta, separators=(",", ":"))

        def write(db: sqlite3.Connection) -> PutResult:
            old = db.execute(
                "SELECT version, data, meta, created_at, updated_at FROM profiles WHERE id = ?", (profile_id,)
            ).fetchone()
            check(condition, profile_id, None if old is None else old[0])
            if old is not None and bytes(old[1]) == data and old[2] == meta_json:
                return PutResult(ProfileRecord(profile_id, old[0], dict(meta), old[3], old[4]), False, True)
            seq = db.execute(
                "INSERT INTO changes (id, deleted, at) VALUES (?, 0, ?)", (profile_id, stamp)
            ).lastrowid
            assert seq is not None  # an INSERT always sets it
            created_at = stamp if old is None else old[3]
            db.execute(
                "INSERT INTO profiles (id, version, data, meta, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET version = excluded.version, "
                "data = excluded.data, meta = excluded.meta, updated_at = excluded.updated_at",
                (profile_id, seq, data, meta_json, created_at, stamp),
            )
            return PutResult(ProfileRecord(profile_id, seq, dict(meta), created_at, stamp), old is None)

        return await self._run(lambda: self._write(write))

    async def get(self, profile_id: str) -> StoredProfile | None:
        row = await self._run(
            lambda: (
                self._db()
                .execute(f"SELECT {_RECORD_COLUMNS}, data FROM profiles WHERE id = ?", (profile_id,))
                .fetchone()
            )
        )
        if row is None:
            return None
        record = self._record(row)
        return StoredProfile(**record.__dict__, data=bytes(row[5]))

    async def get_record(self, profile_id: str) -> ProfileRecord | None:
        row = await self._run(
            lambda: (
                self._db()
                .execute(f"SELECT {_RECORD_COLUMNS} FROM profiles WHERE id = ?", (profile_id,))
                .fetchone()
            )
        )
        return None if row is None else self._record(row)

    async def delete(self, profile_id: str, condition: Condition | None = None) -> int | None:
        def write(db: sqlite3.Connection) -> int | None:
            row = db.execute("SELECT version FROM profiles WHERE id = ?", (profile_id,)).fetchone()
            if row is None:
                return None
            check(condition, profile_id, row[0])
            db.execute("DELETE FROM profiles WHERE id = ?", (profile_id,))
            return db.execute(
                "INSERT INTO changes (id, deleted, at) VALUES (?, 1, ?)", (profile_id, now())
            ).lastrowid

        return await self._run(lambda: self._write(write))

    async def list(self, cursor: str | None, limit: int) -> tuple[list[ProfileRecord], str | None]:
        rows = await self._run(
            lambda: (
                self._db()
                .execute(
                    f"SELECT {_RECORD_COLUMNS} FROM profiles WHERE id > ? ORDER BY id LIMIT ?",
                    (cursor or "", limit + 1),
                )
                .fetchall()
            )
        )
        records = readable_records(rows[:limit], self._record)
        return records, (rows[limit - 1][0] if len(rows) > limit else None)

    async def versions(self, profile_ids: Iterable[str]) -> dict[str, int]:
        ids = list(profile_ids)

        def read() -> dict[str, int]:
            out: dict[str, int] = {}
            for start in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                out.update(
                    self._db()
                    .execute(f"SELECT id, version FROM profiles WHERE id IN ({marks})", chunk)
                    .fetchall()
                )
            return out

        return await self._run(read) if ids else {}

    async def current_seq(self) -> int:
        row = await self._run(
            lambda: self._db().execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        )
        return int(row[0]) if row else 0

    async def watch(self) -> AsyncIterator[ChangeEvent]:
        seen = await self.current_seq()
        yield ChangeEvent(None, seen)
        polls = 0
        while True:
            await asyncio.sleep(self.poll_s)
            after = seen

            def read(after: int = after) -> list[tuple]:
                return (
                    self._db()
                    .execute(
                        "SELECT seq, id, deleted, at FROM changes WHERE seq > ? ORDER BY seq LIMIT 1000",
                        (after,),
                    )
                    .fetchall()
                )

            rows = await self._run(read)
            if rows and rows[0][0] != seen + 1:
                # Writes never leave gaps (a rolled-back insert gives its number back), so a gap
                # means the log was pruned past what this watcher saw: resync instead.
                seen = rows[-1][0]
                yield ChangeEvent(None, seen)
                continue
            for seq, profile_id, deleted, at in rows:
                seen = seq
                yield ChangeEvent(profile_id, seq, bool(deleted), at)
            polls += 1
            if polls % 600 == 0:
                await self._prune()

    async def _prune(self) -> None:
        keep = self.keep_changes
        await self._run(
            lambda: self._write(
                lambda db: db.execute(
                    "DELETE FROM changes WHERE seq <= (SELECT MAX(seq) FROM changes) - ?", (keep,)
                )
            )
        )

    async def ping(self) -> None:
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)
