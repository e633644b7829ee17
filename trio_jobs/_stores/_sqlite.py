"""SQLiteStore: jobs in one SQLite file (WAL mode), the daemons' embedded default.

One connection serves the store, from worker threads (see ``ThreadedSQLStore``), so the
event loop never blocks on the disk.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from typing import Any

import trio

from ._base import WriteBatch
from ._migrations import SQLITE
from ._rows import JOB_COLUMNS, N_JOB_COLUMNS, event_chunks, job_row, upsert_set
from ._sql import ThreadedSQLStore

__all__ = ["SQLiteStore"]

_UPSERT = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * N_JOB_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET " + upsert_set("excluded", "MAX")
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

    migrations = SQLITE

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
            self.path, timeout=5.0, isolation_level=None, check_same_thread=False
        )

    def row_error(self, exc: BaseException) -> bool:
        # OperationalError is the database's (locked, disk full, read-only, I/O);
        # IntegrityError, DataError and InterfaceError (a value it cannot bind) are a row's.
        if isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError)):
            return True
        return super().row_error(exc)

    def _prepare(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        _transaction(conn, self._migrate, "BEGIN IMMEDIATE")

    async def write(self, batch: WriteBatch) -> None:
        if not batch:
            await trio.lowlevel.checkpoint()
            return
        # Rows are encoded here, in the event loop's thread: the worker thread then only
        # runs SQLite, which releases the GIL, instead of contending for it with a busy
        # loop on every row (a narrating job starved its writes for hundreds of ms).
        jobs = [job_row(w) for w in batch.jobs]
        chunks = event_chunks(batch.events)
        prune = batch.prune
        await self._run(lambda conn: _transaction(conn, lambda c: _write(c, jobs, chunks, prune)))


def _transaction(
    conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], None], begin: str = "BEGIN"
) -> None:
    conn.execute(begin)
    try:
        fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (disk full, I/O error): the error to report
        # is the one that ended the transaction, not a failed ROLLBACK.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _write(
    conn: sqlite3.Connection,
    jobs: list[tuple[Any, ...]],
    chunks: list[tuple[str, int, int, str]],
    prune: list[tuple[str, int]],
) -> None:
    if jobs:
        conn.executemany(_UPSERT, jobs)
    if chunks:
        conn.executemany(_EVENTS, chunks)
    if prune:
        conn.executemany(_PRUNE, prune)
