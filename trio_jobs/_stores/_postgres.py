"""PostgresStore: jobs in a PostgreSQL database (psycopg 3), for queens sharing one table.

psycopg's async connections run on asyncio, not trio, so the store uses one synchronous
connection from worker threads (see ``ThreadedSQLStore``). Batched writes go through
``executemany``, which psycopg pipelines, or ``COPY`` when they are big.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .._models import NarrationEvent
from ._base import (
    _NOTICE_BYTES,
    CANCEL,
    EVENTS,
    StoredJob,
    WriteBatch,
    event_notices,
    notices,
    written_notices,
)
from ._listen import Notifier, listen, notify_calls
from ._migrations import POSTGRES
from ._rows import (
    JOB_COLUMNS,
    N_JOB_COLUMNS,
    event_chunks,
    events_from_chunks,
    job_row,
    stored_job_from_row,
    upsert_set,
)
from ._sql import ThreadedSQLStore

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresStore"]

_UPSERT = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({', '.join(['%s'] * N_JOB_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET " + upsert_set("EXCLUDED", "GREATEST")
)
_UPSERT_OWNED = _UPSERT + " WHERE jobs.owner IS NULL OR jobs.owner = %s"
# Big batches go through COPY into session-local staging tables, then one INSERT ... SELECT:
# far less per-row work than executemany's one statement per row.
_STAGING = (
    f"CREATE TEMP TABLE IF NOT EXISTS jobs_in ON COMMIT DELETE ROWS AS "
    f"SELECT {JOB_COLUMNS} FROM jobs WITH NO DATA",
    "CREATE TEMP TABLE IF NOT EXISTS events_in ON COMMIT DELETE ROWS AS "
    "SELECT job_id, first_id, last_id, events FROM events WITH NO DATA",
)
_MERGE_JOBS = (
    f"INSERT INTO jobs ({JOB_COLUMNS}) SELECT {JOB_COLUMNS} FROM jobs_in "
    "ON CONFLICT (id) DO UPDATE SET " + upsert_set("EXCLUDED", "GREATEST")
)
_MERGE_JOBS_OWNED = _MERGE_JOBS + " WHERE jobs.owner IS NULL OR jobs.owner = %s"
_MERGE_EVENTS = (
    "INSERT INTO events SELECT * FROM events_in ON CONFLICT (job_id, first_id) "
    "DO UPDATE SET last_id = EXCLUDED.last_id, events = EXCLUDED.events"
)
_COPY_FROM = 50
"""Batches with at least this many rows of a kind are copied rather than inserted."""
_ACTIVE = "('queued', 'running', 'retrying')"
_EVENTS = (
    "INSERT INTO events VALUES (%s, %s, %s, %s) ON CONFLICT (job_id, first_id) "
    "DO UPDATE SET last_id = EXCLUDED.last_id, events = EXCLUDED.events"
)
_PRUNE = "DELETE FROM events WHERE job_id = %s AND last_id <= %s"
_LOCK_KEY = 0x7472696F  # "trio": the migration advisory lock


class PostgresStore(ThreadedSQLStore["psycopg.Connection[Any]"]):
    """Jobs, transitions and bounded event logs in PostgreSQL.

    Args:
        dsn: a libpq connection string or URL.
        schema: the schema holding the tables (created if missing), so several
            deployments or test runs can share one database.
        node: this queen's name when several share the table (see
            :func:`~trio_jobs._persist.run_shared_jobs`): rows another node has claimed
            are then never overwritten by this one.
        threaded: False runs database calls in the event loop's thread (blocking it);
            only for tests under an autojumping ``MockClock`` (see ``SQLiteStore``).
    """

    param = "%s"
    float_type = "DOUBLE PRECISION"
    migrations = POSTGRES
    job_columns = f"{JOB_COLUMNS}, owner, cancel_requested"
    id_order = 'id COLLATE "C"'

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "trio_jobs",
        node: str | None = None,
        threaded: bool = True,
    ) -> None:
        super().__init__(threaded=threaded)
        self.dsn = dsn
        self.schema = schema
        self.node = node
        self._notifier: Notifier | None = None

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self.schema!r})"

    def _connect(self) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

    def _prepare(self, conn: psycopg.Connection[Any]) -> None:
        from psycopg import sql

        schema = sql.Identifier(self.schema)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
            # A committed SET lasts for the session: every later query uses the schema.
            conn.execute(sql.SQL("SET search_path TO {}").format(schema))
            self._migrate(conn)
        for statement in _STAGING:
            conn.execute(statement)

    def _stored(self, row: Sequence[Any]) -> StoredJob:
        return _stored(row)

    def row_error(self, exc: BaseException) -> bool:
        import psycopg

        if isinstance(exc, (psycopg.DataError, psycopg.IntegrityError)):
            return True
        return super().row_error(exc)

    async def write(self, batch: WriteBatch) -> None:
        if not batch:
            await trio.lowlevel.checkpoint()
            return

        node = self.node
        # Encoded here, in the loop's thread: the worker thread then needs the GIL less,
        # and each time it wants it back from a busy loop it waits up to a switch interval.
        jobs = [job_row(w) for w in batch.jobs]
        chunks = event_chunks(batch.events)

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                if len(jobs) >= _COPY_FROM:
                    with cur.copy(f"COPY jobs_in ({JOB_COLUMNS}) FROM STDIN") as copy:
                        for row in jobs:
                            copy.write_row(row)
                    if node is None:
                        cur.execute(_MERGE_JOBS)
                    else:
                        cur.execute(_MERGE_JOBS_OWNED, (node,))
                elif jobs and node is None:
                    cur.executemany(_UPSERT, jobs)
                elif jobs:
                    cur.executemany(_UPSERT_OWNED, [(*row, node) for row in jobs])
                if len(chunks) >= _COPY_FROM:
                    with cur.copy("COPY events_in FROM STDIN") as copy:
                        for chunk in chunks:
                            copy.write_row(chunk)
                    cur.execute(_MERGE_EVENTS)
                elif chunks:
                    cur.executemany(_EVENTS, chunks)
                if batch.prune:
                    cur.executemany(_PRUNE, batch.prune)
                if node is not None and (batch.jobs or batch.events):
                    # Delivered at commit: the nodes following these jobs read them now.
                    notes = written_notices(batch)
                    if batch.followed:
                        notes = event_notices(chunks, batch.followed) + notes
                    for notice in notes:
                        cur.execute(_NOTIFY, (self.channel, notice))

        await self._run(write)

    # ---- several queens on one table -----------------------------------------------------

    def _node(self) -> str:
        if self.node is None:
            raise RuntimeError("shared mode needs PostgresStore(node=...)")
        return self.node

    async def claim(self, limit: int, lease: float) -> list[StoredJob]:
        """Take up to ``limit`` queued jobs nobody live holds (highest priority, oldest
        first; not past their queue deadline) for this node, leased for ``lease``
        seconds, and start their next attempt in the same statement: the rows come back
        RUNNING with the attempt counted and in their history. A node that dies right
        after claiming therefore leaves a RUNNING job, which a take-over fails (or
        retries, attempts permitting) instead of running it again unseen.
        ``FOR UPDATE SKIP LOCKED`` makes two nodes claiming at once take different jobs."""
        node = self._node()

        def claim(conn: psycopg.Connection[Any]) -> list[StoredJob]:
            now = time.time()
            rows = conn.execute(
                "UPDATE jobs SET owner = %s, lease_until = %s, state = 'running', "
                "attempts = attempts + 1, next_attempt_at = NULL, "
                "started_at = COALESCE(started_at, %s), "
                "history = (history::jsonb || jsonb_build_array(jsonb_build_array("
                "'running', %s::float8, CASE WHEN attempts = 0 THEN 'started on ' || %s "
                "ELSE 'attempt ' || (attempts + 1) || ' on ' || %s END)))::text "
                "WHERE id IN ("
                "SELECT id FROM jobs WHERE state = 'queued' AND NOT cancel_requested "
                "AND (owner IS NULL OR owner = %s OR lease_until < %s) "
                "AND (expires_at IS NULL OR expires_at > %s) "
                "ORDER BY priority DESC, created_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"RETURNING {JOB_COLUMNS}, owner, cancel_requested",
                (node, now + lease, now, now, node, node, node, now, now, limit),
            ).fetchall()
            rows.sort(key=lambda r: (-r[5], r[10]))
            return [_stored(r) for r in rows]

        return await self._run(claim)

    async def take_over(self, limit: int, lease: float) -> list[StoredJob]:
        """Take running jobs whose owner's lease ran out (the owner died) for this node;
        the caller ends or re-queues them as restart recovery does."""
        node = self._node()

        def take(conn: psycopg.Connection[Any]) -> list[StoredJob]:
            now = time.time()
            rows = conn.execute(
                "UPDATE jobs SET owner = %s, lease_until = %s WHERE id IN ("
                "SELECT id FROM jobs WHERE state IN ('running', 'retrying') "
                "AND (owner IS NULL OR (owner <> %s AND lease_until < %s)) "
                "ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"RETURNING {JOB_COLUMNS}, owner, cancel_requested",
                (node, now + lease, node, now, limit),
            ).fetchall()
            return [_stored(r) for r in rows]

        return await self._run(take)

    async def heartbeat(self, lease: float) -> set[str]:
        """Extend the leases of this node's unfinished jobs by ``lease`` seconds; the ids
        of those jobs (a job missing from them was taken over by another node)."""
        node = self._node()

        def beat(conn: psycopg.Connection[Any]) -> set[str]:
            rows = conn.execute(
                f"UPDATE jobs SET lease_until = %s WHERE owner = %s AND state IN {_ACTIVE} "
                "RETURNING id",
                (time.time() + lease, node),
            ).fetchall()
            return {r[0] for r in rows}

        return await self._run(beat)

    async def cancel_requests(self) -> list[str]:
        """Ids of this node's unfinished jobs that some node asked to cancel."""
        node = self._node()

        def asked(conn: psycopg.Connection[Any]) -> list[str]:
            rows = conn.execute(
                f"SELECT id FROM jobs WHERE owner = %s AND cancel_requested AND state IN {_ACTIVE}",
                (node,),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._run(asked)

    async def request_cancel(self, job_ids: list[str]) -> None:
        """Ask the owners of these jobs to cancel them: the request is stored and its
        notice goes out as it commits, in one statement on the notices' connection (not
        behind the store's writes); owners not listening see it at their next poll."""
        payloads = notices(CANCEL, job_ids)
        jobs = _quoted(self.schema) + ".jobs"
        await self._notices().execute(
            f"WITH asked AS (UPDATE {jobs} SET cancel_requested = TRUE "
            "WHERE id IN (SELECT jsonb_array_elements_text($2::jsonb)) "
            f"AND state IN {_ACTIVE} RETURNING id) "
            f"SELECT {notify_calls(3, len(payloads))}",
            [self.channel, json.dumps(job_ids), *payloads],
        )

    async def take_cancelled(self, job_ids: list[str], lease: float) -> list[StoredJob]:
        """Take the queued jobs among ``job_ids`` that no live node claimed (their cancel
        was asked), for this node to write their end."""
        node = self._node()

        def take(conn: psycopg.Connection[Any]) -> list[StoredJob]:
            now = time.time()
            rows = conn.execute(
                "UPDATE jobs SET owner = %s, lease_until = %s WHERE id IN ("
                "SELECT id FROM jobs WHERE id = ANY(%s) AND state = 'queued' "
                "AND (owner IS NULL OR owner = %s OR lease_until < %s) "
                "FOR UPDATE SKIP LOCKED) "
                f"RETURNING {JOB_COLUMNS}, owner, cancel_requested",
                (node, now + lease, job_ids, node, now),
            ).fetchall()
            return [_stored(r) for r in rows]

        return await self._run(take)

    async def poll(self, after: dict[str, int]) -> list[tuple[StoredJob, list[NarrationEvent]]]:
        """Rows held by other nodes among ``after``'s job ids, each with its events after
        the given id: how a node follows jobs that run elsewhere."""
        node = self._node()

        def poll(conn: psycopg.Connection[Any]) -> list[tuple[StoredJob, list[NarrationEvent]]]:
            ids = list(after)
            rows = conn.execute(
                f"SELECT {JOB_COLUMNS}, owner, cancel_requested FROM jobs "
                "WHERE id = ANY(%s) AND owner IS NOT NULL AND owner <> %s",
                (ids, node),
            ).fetchall()
            if not rows:
                return []
            held = [r[0] for r in rows]
            chunks: dict[str, list[str]] = {job_id: [] for job_id in held}
            for job_id, last_id, events in conn.execute(
                "SELECT e.job_id, e.last_id, e.events FROM events e "
                "JOIN unnest(%s::text[], %s::bigint[]) AS a(id, after) ON e.job_id = a.id "
                "WHERE e.last_id > a.after ORDER BY e.job_id, e.first_id",
                (held, [after[job_id] for job_id in held]),
            ):
                if last_id > after[job_id]:
                    chunks[job_id].append(events)
            return [
                (_stored(r), events_from_chunks(r[0], chunks[r[0]], after[r[0]], None))
                for r in rows
            ]

        return await self._run(poll)

    # ---- notifications (LISTEN/NOTIFY) ----------------------------------------------------

    @property
    def channel(self) -> str:
        """The notification channel of the nodes sharing this schema."""
        return f"trio_jobs.{self.schema}"[:63]

    def _notices(self) -> Notifier:
        if not self._opened:
            raise trio.ClosedResourceError("store is not open")
        if self._notifier is None:
            self._notifier = Notifier(self.dsn, self.channel)
        return self._notifier

    async def notify(self, kind: str, job_ids: list[str]) -> None:
        """Tell every node on the schema something about these jobs (see
        :func:`~trio_jobs._stores._base.notices`), at once: on a connection of its own
        (no wait behind the store's writes)."""
        await self._notices().send(notices(kind, job_ids))

    async def notify_events(self, job_id: str, events: Sequence[NarrationEvent]) -> None:
        """Tell the nodes following a job its events as soon as its own readers may see
        them (before they are stored: their ids are reserved in the store, so none is
        ever reused). An event too big for a notice is left out: its followers see the
        gap and read the store."""
        await self._notices().send(_event_notices(job_id, list(events)))

    async def aclose(self) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.close()
        await super().aclose()

    async def listen(
        self,
        deliver: Callable[[str], None],
        *,
        on_state: Callable[[bool], None] = lambda up: None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hand every notice on the schema's channel to ``deliver`` as it arrives (on a
        connection of its own, reconnected after the server went away; ``"*"`` after
        each connection: notices may have been missed)."""
        await listen(
            self.dsn,
            f"LISTEN {_quoted(self.channel)}".encode(),
            deliver,
            on_state=on_state,
            task_status=task_status,
        )


_NOTIFY = "SELECT pg_notify(%s, %s)"


def _quoted(name: str) -> str:
    """An SQL identifier, quoted."""
    return '"' + name.replace('"', '""') + '"'


def _event_notices(job_id: str, events: list[NarrationEvent]) -> list[str]:
    """``e`` notices carrying ``events`` (of one job, oldest first): one per run of
    consecutive ids (a follower copies a notice only when it continues what it has),
    each under the payload limit (a run is halved until it fits; a single event that
    does not fit is left out)."""
    runs: list[list[NarrationEvent]] = []
    for event in events:
        if runs and event.id == runs[-1][-1].id + 1:
            runs[-1].append(event)
        else:
            runs.append([event])
    out: list[str] = []
    while runs:
        run = runs.pop(0)
        _, _, _, chunk = event_chunks(run)[0]
        notice = f"{EVENTS} {job_id} {chunk}"
        if len(notice.encode()) < _NOTICE_BYTES:
            out.append(notice)
        elif len(run) > 1:
            half = len(run) // 2
            runs[:0] = [run[:half], run[half:]]
    return out


def _stored(row: Any) -> StoredJob:
    return stored_job_from_row(row[:N_JOB_COLUMNS], row[N_JOB_COLUMNS], row[N_JOB_COLUMNS + 1])
