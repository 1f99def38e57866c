"""Job records in the embedded store's SQLite file (table ``jobs``, beside ``profiles``).

One connection per thread (the server calls from ``asyncio.to_thread``, a worker from its
consumer and heartbeat threads); every change is one IMMEDIATE transaction. Finished records
older than the TTL are deleted when a new job is created.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
from pathlib import Path

from xpeft.server.jobs import records
from xpeft.server.jobs.records import ACTIVE, JobStore, TooManyJobs, Update, load_record, readable_jobs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_ends (state TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    data BLOB,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS jobs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SQLiteJobStore(JobStore):
    def __init__(
        self, path: str | Path, ttl_s: float, timeout_s: float = 10.0, max_tenant_records: int = 0
    ) -> None:
        super().__init__(ttl_s, max_tenant_records)
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def create(
        self, record: dict, data: bytes, max_active: int | None = None, max_tenant_active: int | None = None
    ) -> str | None:
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")  # the write lock first: the count and the insert are one step
        try:
            db.execute(
                "DELETE FROM jobs WHERE state NOT IN (?, ?) AND updated_at < ?", (*ACTIVE, now - self.ttl_s)
            )
            if record.get("idempotency"):
                prior = db.execute(
                    "SELECT id FROM jobs WHERE json_extract(record, '$.idempotency') = ?",
                    (record["idempotency"],),
                ).fetchone()
                if prior is not None:
                    db.execute("ROLLBACK")
                    return str(prior[0])
            if max_active is not None:
                (active,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", ACTIVE).fetchone()
                if active >= max_active:
                    raise TooManyJobs(active)
            if max_tenant_active is not None:
                (mine,) = db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?) AND json_extract(record, '$.tenant') = ?",
                    (*ACTIVE, record.get("tenant", "")),
                ).fetchone()
                if mine >= max_tenant_active:
                    raise TooManyJobs(mine, tenant=True)
            db.execute(
                "INSERT INTO jobs (id, state, record, data, updated_at) VALUES (?, ?, ?, ?, ?)",
                (record["id"], record["state"], records.dump_record(record), data, now),
            )
            if self.max_tenant_records:  # the tenant's oldest finished records beyond its cap go
                tenant = record.get("tenant", "")
                mine = "FROM jobs WHERE json_extract(record, '$.tenant') = ?"
                (kept,) = db.execute(f"SELECT COUNT(*) {mine}", (tenant,)).fetchone()
                if kept > self.max_tenant_records:
                    db.execute(
                        f"DELETE FROM jobs WHERE id IN (SELECT id {mine} AND state NOT IN (?, ?) "
                        "ORDER BY id LIMIT ?)",
                        (tenant, *ACTIVE, kept - self.max_tenant_records),
                    )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return None

    def purge(self, job_id: str) -> bool:
        return self._db().execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0

    def get(self, job_id: str) -> dict | None:
        row = self._db().execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else load_record(job_id, row[0])

    def data(self, job_id: str) -> bytes | None:
        row = self._db().execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def update(self, job_id: str, fn: Update) -> dict | None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                db.execute("ROLLBACK")
                return None
            record = load_record(job_id, row[0])
            before = record["state"]  # fn may change the record in place
            new = fn(record)
            if new is None:
                db.execute("ROLLBACK")
                return record
            ended = new["state"] not in ACTIVE
            if ended and before in ACTIVE:  # this change ends the job: count it
                db.execute(
                    "INSERT INTO job_ends (state, count) VALUES (?, 1)"
                    " ON CONFLICT (state) DO UPDATE SET count = count + 1",
                    (new["state"],),
                )
            db.execute(
                "UPDATE jobs SET state = ?, record = ?, updated_at = ?"
                + (", data = NULL" if ended else "")
                + " WHERE id = ?",
                (new["state"], records.dump_record(new), time.time(), job_id),
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return new

    def list(self, cursor: str | None, limit: int) -> tuple[builtins.list[dict], str | None]:
        sql = (
            "SELECT id, record FROM jobs" + (" WHERE id < ?" if cursor else "") + " ORDER BY id DESC LIMIT ?"
        )
        rows = self._db().execute(sql, (*([cursor] if cursor else []), limit + 1)).fetchall()
        # the cursor is the page's last row, read or left out: a damaged record never stops paging
        return readable_jobs(rows[:limit]), (rows[limit - 1][0] if len(rows) > limit else None)

    def queued(self) -> builtins.list[tuple[str, str]]:
        rows = (
            self._db()
            .execute(
                "SELECT id, coalesce(json_extract(record, '$.tenant'), '') FROM jobs WHERE state = 'queued' ORDER BY id"
            )
            .fetchall()
        )
        return [(r[0], str(r[1])) for r in rows]

    def last_served(self) -> str | None:
        row = self._db().execute("SELECT value FROM jobs_meta WHERE key = 'last_served'").fetchone()
        return None if row is None else row[0]

    def set_last_served(self, tenant: str) -> None:
        self._db().execute(
            "INSERT INTO jobs_meta (key, value) VALUES ('last_served', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (tenant,),
        )

    def active_ids(self) -> builtins.list[str]:
        rows = self._db().execute("SELECT id FROM jobs WHERE state IN (?, ?) ORDER BY id", ACTIVE).fetchall()
        return [r[0] for r in rows]

    def ended_counts(self) -> dict[str, int]:
        return dict(self._db().execute("SELECT state, count FROM job_ends").fetchall())

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
