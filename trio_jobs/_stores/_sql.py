"""ThreadedSQLStore: the SQL stores' common part (one blocking connection, used from
worker threads, reconnected after the database went away)."""

from __future__ import annotations

import abc
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import trio

from .._json import dumps, loads
from .._models import JobPage, JobQuery, JobRecord, NarrationEvent
from ._base import JobStore, Member, StoredJob
from ._rows import JOB_COLUMNS, events_from_chunks, stored_job_from_row

__all__ = ["Connection", "ThreadedSQLStore"]

logger = logging.getLogger("trio_jobs.store")


class Connection(Protocol):
    """What the SQL stores use of a DB-API connection (sqlite3's, psycopg's)."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


ConnT = TypeVar("ConnT", bound=Connection)
T = TypeVar("T")


class ThreadedSQLStore(JobStore, Generic[ConnT]):
    """A store on one blocking database connection, used from worker threads.

    Every call runs in a worker thread through ``trio.to_thread.run_sync`` behind a
    one-slot ``CapacityLimiter`` (``SQLiteStore`` makes small writes in the loop's thread
    on a second connection, see there), so the event loop does not wait for the
    database and the
    connection is never used by two threads at once (``threaded=False`` runs calls in the
    event loop's thread instead: only for tests under an autojumping ``MockClock``, where
    a task waiting for a thread would let virtual time jump).

    A dialect gives its placeholder, float column type and migrations, opens the
    connection (:meth:`_connect`) and brings the schema up to date inside its own kind of
    transaction (:meth:`_prepare`, which calls :meth:`_migrate`).
    """

    param: ClassVar[str] = "?"
    """The driver's query placeholder."""
    float_type: ClassVar[str] = "REAL"
    migrations: ClassVar[Sequence[tuple[int, Sequence[str]]]] = ()
    """Schema versions, applied in order; each version's statements in one transaction."""
    job_columns: ClassVar[str] = JOB_COLUMNS
    """What the job queries select (:meth:`_stored` reads a row of them back)."""
    id_order: ClassVar[str] = "id"
    """How ids compare in listings: by code point, as Python compares them."""

    def __init__(self, *, threaded: bool = True) -> None:
        self._conn: ConnT | None = None
        self._opened = False
        self._limiter = trio.CapacityLimiter(1)
        self.threaded = threaded
        self.reconnects = 0
        """Connections opened again after the database went away."""

    async def _run(self, fn: Callable[[ConnT], T]) -> T:
        if not self._opened:
            raise trio.ClosedResourceError("store is not open")
        return await self._offload(lambda: self._call(fn))

    def _call(self, fn: Callable[[ConnT], T]) -> T:
        """Run ``fn`` on the connection (in the worker thread), opening it again first if
        an earlier call found the database gone; a failure that is not about the rows
        drops the connection, so the next call reconnects."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self._open_connection()
            self.reconnects += 1
            logger.info("%r: reconnected", self)
        try:
            return fn(conn)
        except BaseException as exc:
            if not self.row_error(exc):
                self._conn = None
                with contextlib.suppress(Exception):  # a broken one may not close cleanly
                    conn.close()
            raise

    async def _offload(self, fn: Callable[[], T]) -> T:
        if not self.threaded:
            await trio.lowlevel.checkpoint()
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    # ---- opening and migrating ---------------------------------------------------------

    @abc.abstractmethod
    def _connect(self) -> ConnT:
        """A new connection (in a worker thread)."""

    @abc.abstractmethod
    def _prepare(self, conn: ConnT) -> None:
        """Set the connection up and call :meth:`_migrate` in a transaction."""

    def _open_connection(self) -> ConnT:
        conn = self._connect()
        try:
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: ConnT) -> None:
        """Apply the migrations newer than the schema's version (the caller holds the
        transaction, and any lock that keeps two processes from migrating at once)."""
        p = self.param
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            f"(version INTEGER PRIMARY KEY, applied_at {self.float_type} NOT NULL)"
        )
        current = self._version(conn)
        for version, statements in self.migrations:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO schema_migrations (version, applied_at) VALUES ({p}, {p})",
                (version, time.time()),
            )

    @staticmethod
    def _version(conn: ConnT) -> int:
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0) if row else 0

    async def open(self) -> None:
        if self._opened:
            await trio.lowlevel.checkpoint()
            return
        self._conn = await self._offload(self._open_connection)
        self._opened = True

    async def aclose(self) -> None:
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        await self._offload(conn.close)

    async def schema_version(self) -> int:
        return await self._run(self._version)

    # ---- reading -------------------------------------------------------------------------

    def _stored(self, row: Sequence[Any]) -> StoredJob:
        return stored_job_from_row(row)

    async def load_jobs(self, *, finished_since: float | None = None) -> list[StoredJob]:
        cols, p = self.job_columns, self.param

        def load(conn: ConnT) -> list[StoredJob]:
            if finished_since is None:
                rows = conn.execute(f"SELECT {cols} FROM jobs ORDER BY created_at").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {cols} FROM jobs WHERE finished_at IS NULL "
                    f"OR finished_at >= {p} ORDER BY created_at",
                    (finished_since,),
                ).fetchall()
            return [self._stored(row) for row in rows]

        return await self._run(load)

    async def load_job(self, job_id: str) -> StoredJob | None:
        return await self._run(lambda conn: self._job(conn, job_id))

    async def load_events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[NarrationEvent]:
        return await self._run(lambda conn: self._events(conn, job_id, after, limit))

    async def load_job_and_events(
        self, job_id: str, *, limit: int | None = None
    ) -> tuple[StoredJob, list[NarrationEvent]] | None:
        """Both reads in one database call (one trip to the worker thread)."""

        def load(conn: ConnT) -> tuple[StoredJob, list[NarrationEvent]] | None:
            stored = self._job(conn, job_id)
            return None if stored is None else (stored, self._events(conn, job_id, 0, limit))

        return await self._run(load)

    def _job(self, conn: ConnT, job_id: str) -> StoredJob | None:
        row = conn.execute(
            f"SELECT {self.job_columns} FROM jobs WHERE id = {self.param}", (job_id,)
        ).fetchone()
        return None if row is None else self._stored(row)

    def _events(
        self, conn: ConnT, job_id: str, after: int, limit: int | None
    ) -> list[NarrationEvent]:
        p = self.param
        if limit is None:
            query = f"SELECT events FROM events WHERE job_id = {p} AND last_id > {p}"
            params: tuple[Any, ...] = (job_id, after)
        else:  # the chunks holding the newest ``limit`` events, in one statement
            query = (
                f"SELECT events FROM events WHERE job_id = {p} AND last_id > {p} AND "
                f"last_id > (SELECT COALESCE(MAX(last_id), 0) FROM events WHERE job_id = {p})"
                f" - {p}"
            )
            params = (job_id, after, job_id, limit)
        rows = conn.execute(query + " ORDER BY first_id", params).fetchall()
        return events_from_chunks(job_id, [r[0] for r in rows], after, limit)

    # ---- listing -------------------------------------------------------------------------

    async def query_jobs(self, query: JobQuery) -> JobPage:
        """Filter and page in the database (``created_at, id`` index). Tags and the
        operation are narrowed with ``LIKE`` on their JSON text and checked exactly on
        the rows read, so a page is read in one query in practice."""
        cols, p, ident = self.job_columns, self.param, self.id_order
        where: list[str] = []
        params: list[Any] = []
        if query.state is not None:
            where.append(f"state = {p}")
            params.append(query.state.value)
        if query.since is not None:
            where.append(f"created_at >= {p}")
            params.append(query.since)
        if query.until is not None:
            where.append(f"created_at < {p}")
            params.append(query.until)
        for key, value in query.tags:
            pattern = _like({key: value})
            if pattern is not None:
                where.append(f"tags LIKE {p} ESCAPE '\\'")
                params.append(pattern)
        if query.operation is not None:
            pattern = _like({"operation": query.operation})
            if pattern is not None:
                where.append(f"payload LIKE {p} ESCAPE '\\'")
                params.append(pattern)
        way = "DESC" if query.descending else "ASC"
        after = "<" if query.descending else ">"
        batch = query.limit + 1

        def run(conn: ConnT) -> list[JobRecord]:
            out: list[JobRecord] = []
            position = query.position
            while True:
                clauses, args = list(where), list(params)
                if position is not None:
                    clauses.append(
                        f"(created_at {after} {p} OR (created_at = {p} AND {ident} {after} {p}))"
                    )
                    args += [position[0], position[0], position[1]]
                sql = f"SELECT {cols} FROM jobs"
                if clauses:
                    sql += " WHERE " + " AND ".join(clauses)
                sql += f" ORDER BY created_at {way}, {ident} {way} LIMIT {batch}"
                rows = conn.execute(sql, args).fetchall()
                for row in rows:
                    record = self._stored(row).record
                    if query.matches(record):
                        out.append(record)
                if len(out) > query.limit or len(rows) < batch:
                    return out
                last = self._stored(rows[-1]).record
                position = (last.created_at, last.id)

        return query.take(await self._run(run))

    # ---- members -------------------------------------------------------------------------

    async def put_member(
        self, kind: str, key: str, data: dict[str, Any], *, node: str | None = None
    ) -> None:
        p = self.param
        row = (kind, key, dumps(data), time.time(), node)

        def put(conn: ConnT) -> None:
            conn.execute(
                f"INSERT INTO members (kind, key, data, seen_at, node) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}) ON CONFLICT (kind, key) DO UPDATE SET "
                "data = excluded.data, seen_at = excluded.seen_at, node = excluded.node",
                row,
            )

        await self._run(put)

    async def drop_member(self, kind: str, key: str) -> None:
        p = self.param

        def drop(conn: ConnT) -> None:
            conn.execute(f"DELETE FROM members WHERE kind = {p} AND key = {p}", (kind, key))

        await self._run(drop)

    async def members(self, kind: str, *, seen_since: float | None = None) -> list[Member]:
        p = self.param

        def read(conn: ConnT) -> list[Member]:
            rows = conn.execute(
                f"SELECT key, data, seen_at, node FROM members WHERE kind = {p} "
                f"AND seen_at >= {p} ORDER BY seen_at",
                (kind, -1.0 if seen_since is None else seen_since),
            ).fetchall()
            return [
                Member(kind, key, loads(data), seen_at, node) for key, data, seen_at, node in rows
            ]

        return await self._run(read)


def _like(pair: dict[str, str]) -> str | None:
    """A ``LIKE`` pattern finding ``"key":"value"`` in a JSON column, or None when the
    text is not plain printable ASCII (its JSON spelling then depends on the codec)."""
    text = dumps(pair)[1:-1]
    if not all(" " <= c <= "~" for c in text):
        return None
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
