"""SQLiteStore: jobs in one SQLite file (WAL mode), the daemons' embedded default.

One connection serves the store from worker threads (see ``ThreadedSQLStore``): reads,
migrations, big writes and the WAL checkpoints (the only fsyncs with ``synchronous =
NORMAL``). Small writes, which are most of them, go through a second connection in the
event loop's own thread: in WAL mode with ``NORMAL`` a commit appends to the WAL in the
page cache and does not sync, so it takes tens of microseconds, far less than handing
the batch to a thread and back. A worker thread would also have to win the GIL back
from a busy loop once per row (a write of a few hundred rows then took hundreds of
milliseconds), which starved the writes of a job narrating flat out. That connection
never waits for a lock (a busy database sends the write to the worker thread, which
waits there) and never checkpoints: every few megabytes a thread of its own checkpoints
the WAL through a third connection, while writes go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from typing import Any

import outcome
import trio

from ._base import JobWrite, WriteBatch
from ._migrations import SQLITE
from ._rows import (
    JOB_COLUMNS,
    N_JOB_COLUMNS,
    event_chunks,
    job_row,
    job_update_row,
    update_set,
    upsert_set,
)
from ._sql import ThreadedSQLStore

__all__ = ["SQLiteStore"]

logger = logging.getLogger("trio_jobs.store")

_UPSERT = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join('?' * N_JOB_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET " + upsert_set("excluded", "MAX")
)
_UPDATE = f"UPDATE jobs SET {update_set('MAX', '?')} WHERE id = ?"
"""A job's later writes: cheaper than the upsert, which tries an insert first."""
_EVENTS = "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?)"
_PRUNE = "DELETE FROM events WHERE job_id = ? AND last_id <= ?"

_LOOP_ROWS = 2000
"""Writes with more rows than this go to the worker thread."""
_LOOP_BYTES = 2 << 20
"""... and writes bigger than this (encoded), so the loop is never held for long."""
_CHECKPOINT_BYTES = 4 << 20
"""After about this much written from the loop, the WAL is checkpointed in a thread
(SQLite's own default is about 4 MB of pages)."""


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
        self._fast: sqlite3.Connection | None = None
        """The connection small writes use in the loop's thread (None: none now)."""
        self._fast_ok = (
            threaded and self.synchronous in ("OFF", "NORMAL") and self.path not in ("", ":memory:")
        )
        """Whether small writes may use the loop's thread: not when each commit syncs
        (FULL), nor for a private in-memory database a second connection cannot see."""
        self._unchecked = 0
        """Bytes written from the loop since the last checkpoint, about."""
        self._checkpointing = False
        self.checkpoints = 0
        """WAL checkpoints run for the writes made from the loop."""
        self.loop_writes = 0
        """Writes committed in the loop's thread (the rest went to a worker thread)."""

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

    def _connect_fast(self) -> sqlite3.Connection:
        """The loop's connection: never waits for a lock, never checkpoints."""
        conn = self._connect()
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _try_connect_fast(self) -> sqlite3.Connection | None:
        try:
            return self._connect_fast()
        except Exception:  # small writes go to the worker thread until a later try
            return None

    def _checkpoint(self) -> None:
        """Copy the WAL into the database (in a thread of its own, on a connection of its
        own: writers go on meanwhile)."""
        # mode=rw: a store closed and its file removed meanwhile is not created again
        uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=rw"
        conn = sqlite3.connect(uri, timeout=5.0, isolation_level=None, uri=True)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    def _checkpointed(self, result: outcome.Outcome[None]) -> None:
        """``start_thread_soon``'s delivery, in the checkpoint's thread."""
        self._checkpointing = False
        self.checkpoints += 1
        if isinstance(result, outcome.Error):  # writes do not depend on it; the next may do
            logger.debug("checkpointing %r failed: %r", self, result.error)

    async def open(self) -> None:
        await super().open()
        if self._fast_ok and self._fast is None:
            self._fast = await self._offload(self._try_connect_fast)

    async def aclose(self) -> None:
        fast, self._fast = self._fast, None
        if fast is not None:
            with contextlib.suppress(Exception):
                fast.close()
        await super().aclose()

    async def write(self, batch: WriteBatch) -> None:
        if not batch:
            await trio.lowlevel.checkpoint()
            return
        writes = batch.jobs
        jobs = [job_row(w) for w in writes if w.first]
        later = [job_update_row(w) for w in writes if not w.first]
        chunks = event_chunks(batch.events)
        prune = batch.prune
        size = 256 * len(writes) + sum(len(chunk[3]) for chunk in chunks)
        fast = self._fast
        if (
            fast is not None
            and len(writes) + len(chunks) <= _LOOP_ROWS
            and size <= _LOOP_BYTES
            and self._opened
        ):
            try:
                _transaction(
                    fast, lambda c: _write(c, jobs, later, writes, chunks, prune), "BEGIN IMMEDIATE"
                )
            except sqlite3.Error as exc:
                if self.row_error(exc):
                    raise
                # Busy (another writer holds the lock): the worker thread waits for it.
                # Anything else: the worker thread's connection finds out what it is.
                if getattr(exc, "sqlite_errorcode", None) not in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED,
                ):
                    self._fast = None
                    with contextlib.suppress(Exception):
                        fast.close()
            else:
                self.loop_writes += 1
                self._unchecked += size
                if self._unchecked >= _CHECKPOINT_BYTES and not self._checkpointing:
                    self._unchecked = 0
                    self._checkpointing = True
                    trio.lowlevel.start_thread_soon(self._checkpoint, self._checkpointed)
                # Committed: a cancel arriving now must not report the write as failed.
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
        reopen = self._fast is None and self._fast_ok

        def work(conn: sqlite3.Connection) -> sqlite3.Connection | None:
            _transaction(conn, lambda c: _write(c, jobs, later, writes, chunks, prune))
            return self._try_connect_fast() if reopen else None

        opened = await self._run(work)
        if opened is not None:
            if self._fast is None and self._opened:
                self._fast = opened
            else:
                opened.close()


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
    later: list[tuple[Any, ...]],
    writes: list[JobWrite],
    chunks: list[tuple[str, int, int, str]],
    prune: list[tuple[str, int]],
) -> None:
    """Upsert the first writes, update the later ones (those whose row is missing after
    all are upserted: the update is only a faster way to the same row)."""
    if jobs:
        conn.executemany(_UPSERT, jobs)
    if later:
        changes = conn.total_changes
        conn.executemany(_UPDATE, later)
        if conn.total_changes - changes < len(later):
            conn.executemany(_UPSERT, [job_row(w) for w in writes if not w.first])
    if chunks:
        conn.executemany(_EVENTS, chunks)
    if prune:
        conn.executemany(_PRUNE, prune)
