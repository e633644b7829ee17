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
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ._models import JobRecord, JobState, NarrationEvent, Priority, RetryPolicy, Transition

__all__ = [
    "JobStore",
    "JobWrite",
    "MemoryStore",
    "StoredJob",
    "WriteBatch",
    "dumps",
    "retry_from_json",
    "retry_to_json",
]

dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Strict compact JSON (no ``default=``: a value JSON cannot hold raises ``TypeError``)."""


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
    data = json.loads(text)
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
    """One job row to insert or update.

    ``payload_json`` / ``metadata_json`` / ``tags_json`` are set on the job's first write
    only: those columns never change afterwards, so later writes update the rest.
    """

    record: JobRecord
    expires_at: float | None = None
    payload_json: str | None = None
    metadata_json: str | None = None
    first: bool = False


@dataclass(slots=True)
class WriteBatch:
    """Everything one flush writes, in one transaction.

    Attributes:
        jobs: job rows to upsert.
        transitions: ``(job_id, index, transition)``: history entries not stored yet.
        events: narration events not stored yet.
        prune: ``(job_id, upto)``: delete the job's stored events with id <= upto (the
            stored log is bounded like the in-memory one).
    """

    jobs: list[JobWrite] = field(default_factory=list)
    transitions: list[tuple[str, int, Transition]] = field(default_factory=list)
    events: list[NarrationEvent] = field(default_factory=list)
    prune: list[tuple[str, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.transitions or self.events or self.prune)


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
    "created_at, started_at, finished_at, next_attempt_at, expires_at"
)
MUTABLE_COLUMNS = (
    "state",
    "error",
    "attempts",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "expires_at",
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
    )


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def stored_job_from_row(
    row: Sequence[Any],
    history: Iterable[Transition],
    owner: str | None = None,
    cancel_requested: bool = False,
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
    return StoredJob(record, tuple(history), expires_at, owner, bool(cancel_requested))


def transition_row(job_id: str, index: int, t: Transition) -> tuple[Any, ...]:
    return (job_id, index, t.state.value, t.at, t.reason)


def transition_from_row(state: str, at: float, reason: str | None) -> Transition:
    return Transition(JobState(state), at, reason)


def event_row(event: NarrationEvent) -> tuple[Any, ...]:
    fields = dumps(dict(event.fields)) if event.fields else None
    return (event.job_id, event.id, event.ts, event.actor, event.action, event.human, fields)


def event_from_row(row: Sequence[Any]) -> NarrationEvent:
    job_id, event_id, ts, actor, action, human, fields = row
    return NarrationEvent(event_id, job_id, ts, actor, action, human, _loads(fields) or {})


# ---- the in-memory store -----------------------------------------------------------------


@dataclass(slots=True)
class _MemJob:
    record: JobRecord
    expires_at: float | None
    history: list[Transition] = field(default_factory=list)
    events: dict[int, NarrationEvent] = field(default_factory=dict)


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
            rec = stored_job_from_row(job_row(w), ()).record
            if old is not None and not w.first:
                prev = old.record
                old.record = dataclasses.replace(
                    rec,
                    payload=prev.payload,
                    metadata=prev.metadata,
                    tags=prev.tags,
                    retry=prev.retry,
                )
                old.expires_at = w.expires_at
            else:
                jobs[rec.id] = _MemJob(rec, w.expires_at, old.history if old else [])
        for job_id, index, t in batch.transitions:
            history = jobs[job_id].history
            if index == len(history):
                history.append(t)
        for event in batch.events:
            jobs[event.job_id].events[event.id] = event_from_row(event_row(event))
        for job_id, upto in batch.prune:
            events = jobs[job_id].events
            for event_id in [i for i in events if i <= upto]:
                del events[event_id]
        self.writes += 1

    def _stored(self, job: _MemJob) -> StoredJob:
        return StoredJob(job.record, tuple(job.history), job.expires_at)

    async def load_jobs(self, *, finished_since: float | None = None) -> list[StoredJob]:
        self._check()
        await trio.lowlevel.checkpoint()
        out = [
            self._stored(j)
            for j in self._jobs.values()
            if finished_since is None
            or j.record.finished_at is None
            or j.record.finished_at >= finished_since
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
        events = [job.events[i] for i in sorted(job.events) if i > after]
        return events[-limit:] if limit is not None else events

    async def schema_version(self) -> int:
        await trio.lowlevel.checkpoint()
        return 1


def check_json(what: str, value: Any) -> str:
    """``value`` as JSON text, or ValueError naming ``what`` when it cannot be stored."""
    try:
        return dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable to be stored: {exc}") from None
