"""JobStore: where job records, transitions and event logs outlive the process.

A store is written by the registry's persistence task in batches (:class:`WriteBatch`)
and read back on start-up (restart recovery) and for jobs that retention dropped from
memory. :class:`MemoryStore` keeps everything in a dict (the library default, and the
fast way to test recovery in one process); ``SQLiteStore`` and ``PostgresStore`` keep it
on disk. Payloads, metadata and event fields are stored as JSON.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import trio

from ._models import JobRecord, JobState, NarrationEvent, Priority, RetryPolicy, Transition

__all__ = [
    "JobStore",
    "JobWrite",
    "MemoryStore",
    "StoredJob",
    "ThreadedSQLStore",
    "WriteBatch",
    "dumps",
    "retry_from_json",
    "retry_to_json",
]


def _json_codec() -> tuple[Callable[[Any], str], Callable[[Any], str], Callable[[str], Any]]:
    """(strict dumps, lenient dumps, loads): orjson's when installed (several times
    faster, which is most of a flush's cost), else the standard library's."""
    try:
        import orjson
    except ImportError:
        strict = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
        lenient = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
        return strict.encode, lenient.encode, json.loads
    options = orjson.OPT_NON_STR_KEYS

    def strict_dumps(value: Any) -> str:
        return orjson.dumps(value, option=options).decode()

    def lenient_dumps(value: Any) -> str:
        return orjson.dumps(value, default=str, option=options).decode()

    return strict_dumps, lenient_dumps, orjson.loads


dumps, dumps_lenient, loads = _json_codec()
"""``dumps``: compact JSON, raising ``TypeError`` for what JSON cannot hold (payloads,
metadata); ``dumps_lenient``: the same with ``str(value)`` for those (event fields, as on
the wire)."""


def retry_to_json(policy: RetryPolicy | None) -> str | None:
    """A retry policy as JSON; ``retry_on`` is kept as ``module:qualname`` strings."""
    if policy is None:
        return None
    data = policy.to_dict()
    data["retry_on"] = [f"{t.__module__}:{t.__qualname__}" for t in policy.retry_on]
    return dumps(data)


def _resolve_type(name: str) -> type[BaseException] | None:
    module, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and issubclass(obj, BaseException):
        return obj
    return None


def retry_from_json(text: str | None) -> RetryPolicy | None:
    """Read :func:`retry_to_json` back; exception types that cannot be imported any more
    are replaced by ``Exception`` (a recovered job still retries rather than never)."""
    if not text:
        return None
    data = loads(text)
    names = data.pop("retry_on", None) or []
    types = tuple(t for t in (_resolve_type(n) for n in names) if t is not None)
    return RetryPolicy(**data, retry_on=types or (Exception,))


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as read back from a store: its record, full history and queue deadline."""

    record: JobRecord
    history: tuple[Transition, ...] = ()
    expires_at: float | None = None
    """Epoch time after which the job, if still queued, fails without running."""
    owner: str | None = None
    cancel_requested: bool = False


@dataclass(frozen=True, slots=True)
class JobWrite:
    """One job row to insert or update, with the job's whole history.

    ``payload_json`` / ``metadata_json`` are set on the job's first write (``first``)
    only: payload, metadata, tags and retry policy never change afterwards, so later
    writes update the rest.
    """

    record: JobRecord
    history: tuple[Transition, ...] = ()
    expires_at: float | None = None
    payload_json: str | None = None
    metadata_json: str | None = None
    first: bool = False


@dataclass(slots=True)
class WriteBatch:
    """Everything one flush writes, in one transaction.

    Attributes:
        jobs: job rows to upsert.
        events: narration events not stored yet, each job's in one consecutive run
            of ascending ids (SQL stores keep each run as one row: a chunk).
        prune: ``(job_id, upto)``: the job's stored events with id <= upto may go (the
            stored log is bounded like the in-memory one; a chunk goes once all of its
            events may).
    """

    jobs: list[JobWrite] = field(default_factory=list)
    events: list[NarrationEvent] = field(default_factory=list)
    prune: list[tuple[str, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.events or self.prune)


class JobStore(abc.ABC):
    """Durable home of jobs. All methods are async and safe to call from trio tasks.

    Implementations must be usable again after :meth:`aclose` by calling :meth:`open`.
    Blocking database work happens off the event loop (``trio.to_thread``); cancelling a
    call waits for the database call in flight to end, so a write is never half-applied.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date (versioned migrations)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the connection; idempotent."""

    @abc.abstractmethod
    async def write(self, batch: WriteBatch) -> None:
        """Apply one batch atomically."""

    @abc.abstractmethod
    async def load_jobs(self, *, finished_since: float | None = None) -> list[StoredJob]:
        """Every unfinished job, and the finished ones with ``finished_at >=
        finished_since`` (all of them when None), oldest first, with their history."""

    @abc.abstractmethod
    async def load_job(self, job_id: str) -> StoredJob | None:
        """One job with its history, or None."""

    @abc.abstractmethod
    async def load_events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[NarrationEvent]:
        """Stored events of a job with id > ``after``, oldest first; with ``limit``,
        the newest ``limit`` of them."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest schema migration applied (0 for a store without a schema)."""

    async def __aenter__(self) -> JobStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


# ---- row helpers shared by the SQL stores ----------------------------------------------


JOB_COLUMNS = (
    "id, state, error, payload, timeout, priority, retry, tags, metadata, attempts, "
    "created_at, started_at, finished_at, next_attempt_at, expires_at, history"
)
N_JOB_COLUMNS = 16
MUTABLE_COLUMNS = (
    "state",
    "error",
    "attempts",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "expires_at",
    "history",
)


def job_row(write: JobWrite) -> tuple[Any, ...]:
    rec = write.record
    tags = dumps(dict(rec.tags)) if write.first and rec.tags else None
    return (
        rec.id,
        rec.state.value,
        rec.error,
        write.payload_json,
        rec.timeout,
        int(rec.priority),
        retry_to_json(rec.retry) if write.first else None,
        tags,
        write.metadata_json,
        rec.attempts,
        rec.created_at,
        rec.started_at,
        rec.finished_at,
        rec.next_attempt_at,
        write.expires_at,
        dumps([(t.state.value, t.at, t.reason) for t in write.history]),
    )


def _loads(text: str | None) -> Any:
    return None if text is None else loads(text)


def stored_job_from_row(
    row: Sequence[Any], owner: str | None = None, cancel_requested: bool = False
) -> StoredJob:
    """Rebuild a :class:`StoredJob` from a row in ``JOB_COLUMNS`` order."""
    (
        job_id,
        state,
        error,
        payload,
        timeout,
        priority,
        retry,
        tags,
        metadata,
        attempts,
        created_at,
        started_at,
        finished_at,
        next_attempt_at,
        expires_at,
        history,
    ) = row
    record = JobRecord(
        id=job_id,
        state=JobState(state),
        error=error,
        payload=_loads(payload),
        timeout=timeout,
        priority=Priority(priority),
        tags=_loads(tags) or {},
        metadata=_loads(metadata),
        attempts=attempts,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        retry=retry_from_json(retry),
        next_attempt_at=next_attempt_at,
    )
    transitions = tuple(
        Transition(JobState(state), at, reason) for state, at, reason in _loads(history) or ()
    )
    return StoredJob(record, transitions, expires_at, owner, bool(cancel_requested))


def _plain(fields: Mapping[str, Any]) -> dict[str, Any]:
    return fields if type(fields) is dict else dict(fields)


def event_chunks(events: Iterable[NarrationEvent]) -> list[tuple[str, int, int, str]]:
    """Rows ``(job_id, first_id, last_id, events_json)``: one per run of a job's events."""
    rows: list[tuple[str, int, int, str]] = []
    for job_id, run in itertools.groupby(events, key=lambda e: e.job_id):
        events = list(run)
        items = [
            (e.id, e.ts, e.actor, e.action, e.human, _plain(e.fields) if e.fields else None)
            for e in events
        ]
        rows.append((job_id, events[0].id, events[-1].id, dumps_lenient(items)))
    return rows


def events_from_chunks(
    job_id: str, chunks: Iterable[str], after: int, limit: int | None
) -> list[NarrationEvent]:
    """The events with id > ``after`` (the newest ``limit``) in chunks, oldest first."""
    out: dict[int, NarrationEvent] = {}
    for chunk in chunks:
        for event_id, ts, actor, action, human, fields in loads(chunk):
            if event_id > after:
                out[event_id] = NarrationEvent(
                    event_id, job_id, ts, actor, action, human, fields or {}
                )
    events = [out[i] for i in sorted(out)]
    return events[-limit:] if limit is not None else events


# ---- the SQL stores' common part -----------------------------------------------------------


class Connection(Protocol):
    """What the SQL stores use of a DB-API connection (sqlite3's, psycopg's)."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def close(self) -> None: ...


ConnT = TypeVar("ConnT", bound=Connection)
T = TypeVar("T")


class ThreadedSQLStore(JobStore, Generic[ConnT]):
    """A store on one blocking database connection, used from worker threads.

    Every call runs in a worker thread through ``trio.to_thread.run_sync`` behind a
    one-slot ``CapacityLimiter``, so the event loop never blocks on the database and the
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
    migrations: ClassVar[list[tuple[int, list[str]]]] = []
    """Schema versions, applied in order; each version's statements in one transaction."""
    job_columns: ClassVar[str] = JOB_COLUMNS
    """What the job queries select (:meth:`_stored` reads a row of them back)."""

    def __init__(self, *, threaded: bool = True) -> None:
        self._conn: ConnT | None = None
        self._limiter = trio.CapacityLimiter(1)
        self.threaded = threaded

    async def _run(self, fn: Callable[[ConnT], T]) -> T:
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
        if self._conn is not None:
            await trio.lowlevel.checkpoint()
            return
        self._conn = await self._offload(self._open_connection)

    async def aclose(self) -> None:
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
        cols, p = self.job_columns, self.param

        def load(conn: ConnT) -> StoredJob | None:
            row = conn.execute(f"SELECT {cols} FROM jobs WHERE id = {p}", (job_id,)).fetchone()
            return None if row is None else self._stored(row)

        return await self._run(load)

    async def load_events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[NarrationEvent]:
        p = self.param

        def load(conn: ConnT) -> list[NarrationEvent]:
            lower = after
            if limit is not None:
                top = conn.execute(
                    f"SELECT COALESCE(MAX(last_id), 0) FROM events WHERE job_id = {p}",
                    (job_id,),
                ).fetchone()
                lower = max(after, (top[0] if top else 0) - limit)
            rows = conn.execute(
                f"SELECT events FROM events WHERE job_id = {p} AND last_id > {p} ORDER BY first_id",
                (job_id, lower),
            ).fetchall()
            return events_from_chunks(job_id, [r[0] for r in rows], after, limit)

        return await self._run(load)


# ---- the in-memory store -----------------------------------------------------------------


@dataclass(slots=True)
class _MemJob:
    stored: StoredJob
    chunks: dict[int, tuple[int, str]] = field(default_factory=dict)
    """first event id -> (last event id, JSON of the run), as the SQL stores keep them."""


class MemoryStore(JobStore):
    """A store in a dict: survives a registry, not the process.

    Values are round-tripped through JSON on write, like the SQL stores, so what a test
    reads back is what a database would give.
    """

    def __init__(self) -> None:
        self._jobs: dict[str, _MemJob] = {}
        self._open = False
        self.writes = 0

    async def open(self) -> None:
        self._open = True
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self._open = False
        await trio.lowlevel.checkpoint()

    def _check(self) -> None:
        if not self._open:
            raise trio.ClosedResourceError("store is not open")

    async def write(self, batch: WriteBatch) -> None:
        self._check()
        await trio.lowlevel.checkpoint()
        jobs = self._jobs
        for w in batch.jobs:
            old = jobs.get(w.record.id)
            new = stored_job_from_row(job_row(w))
            if old is None:
                jobs[w.record.id] = _MemJob(new)
            elif w.first:
                old.stored = new
            else:
                prev = old.stored.record
                record = dataclasses.replace(
                    new.record,
                    payload=prev.payload,
                    metadata=prev.metadata,
                    tags=prev.tags,
                    retry=prev.retry,
                )
                old.stored = dataclasses.replace(new, record=record)
        for job_id, first, last, chunk in event_chunks(batch.events):
            jobs[job_id].chunks[first] = (last, chunk)
        for job_id, upto in batch.prune:
            chunks = jobs[job_id].chunks
            for first in [f for f, (last, _) in chunks.items() if last <= upto]:
                del chunks[first]
        self.writes += 1

    def _stored(self, job: _MemJob) -> StoredJob:
        return job.stored

    async def load_jobs(self, *, finished_since: float | None = None) -> list[StoredJob]:
        self._check()
        await trio.lowlevel.checkpoint()
        out = [
            self._stored(j)
            for j in self._jobs.values()
            if finished_since is None
            or j.stored.record.finished_at is None
            or j.stored.record.finished_at >= finished_since
        ]
        out.sort(key=lambda s: s.record.created_at)
        return out

    async def load_job(self, job_id: str) -> StoredJob | None:
        self._check()
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        return None if job is None else self._stored(job)

    async def load_events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[NarrationEvent]:
        self._check()
        await trio.lowlevel.checkpoint()
        job = self._jobs.get(job_id)
        if job is None:
            return []
        chunks = [job.chunks[f][1] for f in sorted(job.chunks)]
        return events_from_chunks(job_id, chunks, after, limit)

    async def schema_version(self) -> int:
        await trio.lowlevel.checkpoint()
        return 1


def check_json(what: str, value: Any) -> str:
    """``value`` as JSON text, or ValueError naming ``what`` when it cannot be stored."""
    try:
        return dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable to be stored: {exc}") from None
