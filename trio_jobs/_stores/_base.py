"""The store contract: where job records, transitions and event logs outlive the process.

A store is written by the registry's persistence task in batches (:class:`WriteBatch`)
and read back on start-up (restart recovery) and for jobs that retention dropped from
memory. Several nodes sharing one store (queens on one PostgreSQL) use the
:class:`SharedStore` operations on top. Payloads, metadata, event fields and error texts
are stored as JSON (``trio_jobs._json``), so any text round-trips on every store.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Self, runtime_checkable

import trio

from .._json import dumps, loads
from .._models import (
    JobPage,
    JobQuery,
    JobRecord,
    JobState,
    NarrationEvent,
    RetryPolicy,
    Transition,
)

__all__ = [
    "JobStore",
    "Member",
    "JobWrite",
    "SharedStore",
    "StoredJob",
    "WriteBatch",
    "check_json",
    "retry_from_json",
    "retry_to_json",
]


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
    reserved_id: int = 0
    """Event ids up to this one may have been handed out to readers."""


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of a store's directory of cluster members (a worker, a hive).

    ``data`` is the member's JSON-ready description; ``seen_at`` the epoch time it was
    last recorded (a heartbeat); ``node`` the node that recorded it.
    """

    kind: str
    key: str
    data: dict[str, Any]
    seen_at: float
    node: str | None = None


class JobWrite(NamedTuple):
    """One job row to insert or update, with the job's whole history.

    ``payload_json`` / ``metadata_json`` are set on the job's first write (``first``)
    only: payload, metadata, tags and retry policy never change afterwards, so later
    writes update the rest. ``reserved_id`` never decreases in the store. (A named
    tuple: persistence makes one per job change, and a tuple is several times cheaper to
    make than a frozen dataclass.)
    """

    record: JobRecord
    history: tuple[Transition, ...] = ()
    expires_at: float | None = None
    payload_json: str | None = None
    metadata_json: str | None = None
    first: bool = False
    reserved_id: int = 0


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
    followed: set[str] = field(default_factory=set)
    """Jobs other nodes follow: a store that notifies sends their new events along."""

    def __bool__(self) -> bool:
        return bool(self.jobs or self.events or self.prune)

    def extend(self, other: WriteBatch) -> None:
        self.jobs.extend(other.jobs)
        self.events.extend(other.events)
        self.prune.extend(other.prune)


class JobStore(abc.ABC):
    """Durable home of jobs. All methods are async and safe to call from trio tasks.

    Implementations must be usable again after :meth:`aclose` by calling :meth:`open`.
    Blocking database work happens off the event loop (``trio.to_thread``), but for
    what cannot block (``SQLiteStore``'s small WAL writes, which never wait for a lock or
    sync); cancelling a call waits for the database call in flight to end, so a write is
    never half-applied.
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

    async def load_job_and_events(
        self, job_id: str, *, limit: int | None = None
    ) -> tuple[StoredJob, list[NarrationEvent]] | None:
        """One job with its stored events (the newest ``limit`` of them), or None without
        the job: what a node needs to make a job known. This default reads them in two
        calls; the SQL stores read them in one."""
        stored = await self.load_job(job_id)
        if stored is None:
            return None
        return stored, await self.load_events(job_id, limit=limit)

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The highest schema migration applied (0 for a store without a schema)."""

    async def query_jobs(self, query: JobQuery) -> JobPage:
        """One page of the stored jobs matching ``query`` (see :class:`JobQuery`), jobs
        that retention dropped from memory included. This default reads every job; the
        SQL stores filter and paginate in the database."""
        return query.page(stored.record for stored in await self.load_jobs())

    async def put_member(
        self, kind: str, key: str, data: dict[str, Any], *, node: str | None = None
    ) -> None:
        """Record (or refresh) a cluster member: a worker's heartbeat, a hive's address.
        Several queens on one store see each other's members."""
        raise NotImplementedError(f"{self!r} keeps no members")

    async def drop_member(self, kind: str, key: str) -> None:
        """Forget a member (a worker that stopped, a hive removed)."""
        raise NotImplementedError(f"{self!r} keeps no members")

    async def members(self, kind: str, *, seen_since: float | None = None) -> list[Member]:
        """The members of a kind (recorded at or after ``seen_since``, epoch time),
        oldest recorded first."""
        raise NotImplementedError(f"{self!r} keeps no members")

    async def ping(self) -> None:
        """Raise unless the store answers (reconnecting first if it had gone away)."""
        await self.schema_version()

    def row_error(self, exc: BaseException) -> bool:
        """True when ``exc`` from :meth:`write` is about the rows written (one bad value),
        not about the store (gone, locked, full): the batch is then written job by job so
        one bad row cannot block the others."""
        return isinstance(exc, (ValueError, TypeError, OverflowError, UnicodeError))

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


@runtime_checkable
class SharedStore(Protocol):
    """The operations with which several nodes share one store's jobs.

    Every job row has an ``owner`` (the node running it, or about to) and a lease; a
    node renews its leases by heartbeats, and a node whose leases ran out is taken to
    be dead. Writes of a node never overwrite a row another node owns.
    """

    node: str | None

    async def claim(self, limit: int, lease: float) -> list[StoredJob]:
        """Take up to ``limit`` queued jobs for this node and start their next attempt
        in the same transaction (the rows come back RUNNING, attempts counted)."""

    async def take_over(self, limit: int, lease: float) -> list[StoredJob]:
        """Take running jobs whose owner's lease ran out, for this node."""

    async def heartbeat(self, lease: float) -> set[str]:
        """Renew this node's leases; the ids of the unfinished jobs it still owns."""

    async def cancel_requests(self) -> list[str]:
        """Ids of this node's unfinished jobs that some node asked to cancel."""

    async def request_cancel(self, job_ids: list[str]) -> None:
        """Ask the owners of these jobs to cancel them."""

    async def take_cancelled(self, job_ids: list[str], lease: float) -> list[StoredJob]:
        """Take the unclaimed queued jobs among ``job_ids`` (their cancel was asked)."""

    async def poll(self, after: dict[str, int]) -> list[tuple[StoredJob, list[NarrationEvent]]]:
        """Rows other nodes hold among ``after``'s ids, each with its events after the id."""

    async def put_member(
        self, kind: str, key: str, data: dict[str, Any], *, node: str | None = None
    ) -> None:
        """Record a member (a worker heartbeat reaching this node, a hive): every node
        reads it back with :meth:`members`."""

    async def drop_member(self, kind: str, key: str) -> None:
        """Forget a member for every node."""

    async def members(self, kind: str, *, seen_since: float | None = None) -> list[Member]:
        """The members every node recorded."""

    async def notify(self, kind: str, job_ids: list[str]) -> None:
        """Tell every node about these jobs at once (see :func:`notices`). Writes and
        cancel requests notify by themselves: ``w`` and ``c`` notices at commit."""

    async def listen(
        self,
        deliver: Callable[[str], None],
        *,
        on_state: Callable[[bool], None] = ...,
        task_status: trio.TaskStatus[None] = ...,
    ) -> None:
        """Forever: every notice of every node, as it is committed; ``"*"`` after each
        (re)connection, when notices may have been missed."""


WRITTEN, QUEUED, CANCEL, FOLLOW, EVENTS = "w", "q", "c", "f", "e"
"""Notice kinds: rows of these jobs were written; new jobs were queued (claim them); their
cancel was asked; a node follows them (their owner then writes their events at once);
``e <job id> <chunk>``: events of a followed job just stored (as the events table holds
them), so followers need not read them back."""
_NOTICE_BYTES = 7900
"""PostgreSQL's notification payloads hold less than 8000 bytes."""


def notices(kind: str, job_ids: Iterable[str]) -> list[str]:
    """``kind`` and the job ids, space-separated, split to fit notification payloads."""
    out: list[str] = []
    current = kind
    for job_id in job_ids:
        if len(current) + len(job_id.encode()) + 1 > _NOTICE_BYTES:
            out.append(current)
            current = kind
        current += " " + job_id
    if current != kind or not out:
        out.append(current)
    return out


def written_notices(batch: WriteBatch) -> list[str]:
    """The notices of a written batch: its job ids (``"w *"`` when they do not fit in
    one notice), and the new queued jobs among them."""
    ids = dict.fromkeys(w.record.id for w in batch.jobs)
    ids.update(dict.fromkeys(e.job_id for e in batch.events))
    parts = notices(WRITTEN, ids)
    out = [parts[0] if len(parts) == 1 else f"{WRITTEN} *"]
    new = [w.record.id for w in batch.jobs if w.first and w.record.state is JobState.QUEUED]
    if new:
        out += notices(QUEUED, new)
    return out


def event_notices(chunks: list[tuple[str, int, int, str]], followed: set[str]) -> list[str]:
    """``e`` notices for the stored event chunks of followed jobs that fit a notice."""
    return [
        f"{EVENTS} {job_id} {chunk}"
        for job_id, _first, _last, chunk in chunks
        if job_id in followed and len(chunk.encode()) + len(job_id.encode()) < _NOTICE_BYTES
    ]


def parse_notice(payload: str) -> tuple[str, list[str]]:
    """A notice as ``(kind, job ids)``; ``"*"`` (after a reconnection) is ``("*", [])``."""
    kind, _, rest = payload.partition(" ")
    return kind, rest.split()


def check_json(what: str, value: Any) -> str:
    """``value`` as JSON text, or ValueError naming ``what`` when it cannot be stored."""
    try:
        return dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable to be stored: {exc}") from None
