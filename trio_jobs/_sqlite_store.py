"""SQLiteStore: jobs in one SQLite file (WAL mode), the daemons' embedded default.

One connection serves the store, from worker threads (see ``ThreadedSQLStore``), so the
event loop never blocks on the disk.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable

import trio

from ._store import (
    JOB_COLUMNS,
    MUTABLE_COLUMNS,
    N_JOB_COLUMNS,
    ThreadedSQLStore,
    WriteBatch,
    event_chunks,
    job_row,
)

__all__ = ["SQLiteStore", "MIGRATIONS"]

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


class SQLiteStore(ThreadedSQLStore[sqlite3.Connection]):
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

    migrations = MIGRATIONS

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", threaded: bool = True
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        super().__init__(threaded=threaded)
        self.path = os.fspath(path)
        self.synchronous = synchronous.upper()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA busy_timeout = 30000")
        _transaction(conn, self._migrate, "BEGIN IMMEDIATE")

    async def write(self, batch: WriteBatch) -> None:
        if batch:
            await self._run(lambda conn: _transaction(conn, lambda c: _write(c, batch)))
        else:
            await trio.lowlevel.checkpoint()


def _transaction(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], None], begin: str = "BEGIN"
) -> None:
    conn.execute(begin)
    try:
        fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _write(conn: sqlite3.Connection, batch: WriteBatch) -> None:
    if batch.jobs:
        conn.executemany(_UPSERT, [job_row(w) for w in batch.jobs])
    if batch.events:
        conn.executemany(_EVENTS, event_chunks(batch.events))
    if batch.prune:
        conn.executemany(_PRUNE, batch.prune)
