"""SQLiteStore: jobs in one SQLite file (WAL mode), the daemons' embedded default.

One connection serves the store; every call runs in a worker thread through
``trio.to_thread.run_sync`` behind a one-slot ``CapacityLimiter``, so the event loop never
blocks on the disk and the connection is never used by two threads at once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from ._models import NarrationEvent
from ._store import (
    JOB_COLUMNS,
    MUTABLE_COLUMNS,
    N_JOB_COLUMNS,
    JobStore,
    StoredJob,
    WriteBatch,
    event_chunks,
    events_from_chunks,
    job_row,
    stored_job_from_row,
)

__all__ = ["SQLiteStore", "MIGRATIONS"]

T = TypeVar("T")

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                error TEXT,
                payload TEXT,
                timeout REAL,
                priority INTEGER NOT NULL,
                retry TEXT,
                tags TEXT,
                metadata TEXT,
                attempts INTEGER NOT NULL,
                created_at REAL NOT NULL,
                started_at REAL,
                finished_at REAL,
                next_attempt_at REAL,
                expires_at REAL,
                history TEXT NOT NULL
            )""",
            "CREATE INDEX jobs_unfinished ON jobs (finished_at, created_at)",
            """CREATE TABLE events (
                job_id TEXT NOT NULL,
                first_id INTEGER NOT NULL,
                last_id INTEGER NOT NULL,
                events TEXT NOT NULL,
                PRIMARY KEY (job_id, first_id)
            ) WITHOUT ROWID""",
        ],
    ),
]
"""Schema versions, applied in order; each version's statements run in one transaction.

A job's history is a JSON column of its row; its events are stored in chunks, one row per
run of events written by one flush (``[[id, ts, actor, action, human, fields], ...]``).
"""

_UPSERT = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * N_JOB_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in MUTABLE_COLUMNS)
)
_EVENTS = "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)"
_PRUNE = "DELETE FROM events WHERE job_id = ? AND last_id <= ?"


class SQLiteStore(JobStore):
    """Jobs, transitions and bounded event logs in a SQLite database file.

    Args:
        path: the database file (created if missing); ``":memory:"`` works for tests.
        synchronous: SQLite's ``synchronous`` pragma. ``NORMAL`` (the default) in WAL
            mode loses at most the last transactions on power loss, never on a process
            crash; ``FULL`` syncs every flush.
        threaded: False runs database calls in the event loop's thread (blocking it).
            Only for tests under ``MockClock(autojump_threshold=0)``: while a task waits
            for a worker thread, autojump sees every task blocked and jumps virtual time.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", threaded: bool = True
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)
        self.threaded = threaded

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise trio.ClosedResourceError("store is not open")
        return await self._offload(lambda: fn(conn))

    async def _offload(self, fn: Callable[[], T]) -> T:
        if not self.threaded:
            await trio.lowlevel.checkpoint()
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    # ---- opening and migrating ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA busy_timeout = 30000")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        if self._conn is not None:
            await trio.lowlevel.checkpoint()
            return
        self._conn = await self._offload(self._connect)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        await self._offload(conn.close)

    async def schema_version(self) -> int:
        return await self._run(_version)

    # ---- writing -------------------------------------------------------------------------

    async def write(self, batch: WriteBatch) -> None:
        if batch:
            await self._run(lambda conn: _write(conn, batch))
        else:
            await trio.lowlevel.checkpoint()

    # ---- reading -------------------------------------------------------------------------

    async def load_jobs(self, *, finished_since: float | None = None) -> list[StoredJob]:
        def load(conn: sqlite3.Connection) -> list[StoredJob]:
            if finished_since is None:
                rows = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at")
            else:
                rows = conn.execute(
                    f"SELECT {JOB_COLUMNS} FROM jobs WHERE finished_at IS NULL "
                    "OR finished_at >= ? ORDER BY created_at",
                    (finished_since,),
                )
            return [stored_job_from_row(row) for row in rows]

        return await self._run(load)

    async def load_job(self, job_id: str) -> StoredJob | None:
        def load(conn: sqlite3.Connection) -> StoredJob | None:
            row = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else stored_job_from_row(row)

        return await self._run(load)

    async def load_events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[NarrationEvent]:
        def load(conn: sqlite3.Connection) -> list[NarrationEvent]:
            lower = after
            if limit is not None:
                (top,) = conn.execute(
                    "SELECT COALESCE(MAX(last_id), 0) FROM events WHERE job_id = ?", (job_id,)
                ).fetchone()
                lower = max(after, top - limit)
            rows = conn.execute(
                "SELECT events FROM events WHERE job_id = ? AND last_id > ? ORDER BY first_id",
                (job_id, lower),
            )
            return events_from_chunks(job_id, [r[0] for r in rows], after, limit)

        return await self._run(load)


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        current = _version(conn)
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _write(conn: sqlite3.Connection, batch: WriteBatch) -> None:
    conn.execute("BEGIN")
    try:
        if batch.jobs:
            conn.executemany(_UPSERT, [job_row(w) for w in batch.jobs])
        if batch.events:
            conn.executemany(_EVENTS, event_chunks(batch.events))
        if batch.prune:
            conn.executemany(_PRUNE, batch.prune)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
