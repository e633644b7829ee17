"""Value objects: job states, priorities, retry policies, records and narration events."""

from __future__ import annotations

import enum
import json
import math
import random
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple

__all__ = [
    "JobPage",
    "JobQuery",
    "JobRecord",
    "JobState",
    "NarrationEvent",
    "Priority",
    "RetryPolicy",
    "Transition",
    "iso_time",
]


def iso_time(ts: float | None) -> str | None:
    """UTC ISO-8601 text for an epoch timestamp."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # not a date (validation keeps them out)
        return "9999-12-31T23:59:59Z" if ts > 0 else "0001-01-01T00:00:00Z"


class JobState(enum.Enum):
    """Where a job is in its lifecycle; the last three never change again."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """True while a cancel can still change the outcome."""
        return self not in _TERMINAL


_TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


class Priority(enum.IntEnum):
    """Scheduling priority: higher runs first, FIFO within one priority."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, value: Priority | str | int) -> Priority:
        """Accept a Priority, its lower-case name (``"high"``) or its number."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(
                    f"priority must be one of low, normal, high, critical; got {value!r}"
                ) from None
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        raise ValueError(f"priority must be a name or number, got {value!r}")

    @property
    def label(self) -> str:
        return self.name.lower()


MAX_RETRY_DELAY_S = 30 * 86400.0
"""The longest a retry may wait (``backoff_base`` and ``cap``): every time a job can carry
stays a valid date."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how soon a failed job runs again.

    Attempt ``n`` (1-based) that fails waits ``min(cap, backoff_base * factor**(n-1))``
    seconds, spread by up to ``jitter`` (a fraction: 0.1 = ±10 %), before attempt ``n+1``.
    Only exceptions that are instances of ``retry_on`` are retried; a timeout is retried
    only when ``retry_timeouts`` is true. A cancel is never retried.
    """

    max_attempts: int = 3
    backoff_base: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    retry_timeouts: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        for name in ("backoff_base", "factor", "cap", "jitter"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.backoff_base < 0 or self.factor < 1 or self.cap < 0:
            raise ValueError("backoff_base and cap must be >= 0 and factor >= 1")
        if self.backoff_base > MAX_RETRY_DELAY_S or self.cap > MAX_RETRY_DELAY_S:
            raise ValueError(f"backoff_base and cap must be at most {MAX_RETRY_DELAY_S:g} s")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        try:
            grown = self.backoff_base * self.factor ** (attempt - 1)
        except OverflowError:
            grown = math.inf if self.backoff_base else 0.0
        base = min(self.cap, grown)
        if self.jitter:
            spread = base * self.jitter
            base += (rng or random).uniform(-spread, spread)
        return max(0.0, base)

    def should_retry(self, attempt: int, exc: BaseException | None, *, timed_out: bool) -> bool:
        """Whether failed attempt ``attempt`` is followed by another."""
        if attempt >= self.max_attempts:
            return False
        if timed_out:
            return self.retry_timeouts
        return exc is not None and isinstance(exc, self.retry_on)

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "backoff_base": self.backoff_base,
            "factor": self.factor,
            "cap": self.cap,
            "jitter": self.jitter,
            "retry_timeouts": self.retry_timeouts,
        }


@dataclass(frozen=True, slots=True)
class Transition:
    """One entry of a job's history: the state it entered, when (epoch s) and why."""

    state: JobState
    at: float
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "at": iso_time(self.at), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A snapshot of a job; times are UNIX epoch seconds (wall clock)."""

    id: str
    state: JobState
    error: str | None
    payload: Any
    timeout: float | None
    priority: Priority
    tags: Mapping[str, str]
    metadata: Any
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    retry: RetryPolicy | None = None
    next_attempt_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (times as UTC ISO-8601)."""
        return {
            "job_id": self.id,
            "state": self.state.value,
            "error": self.error,
            "payload": self.payload,
            "timeout_s": self.timeout,
            "priority": self.priority.label,
            "tags": dict(self.tags),
            "metadata": self.metadata,
            "attempts": self.attempts,
            "created_at": iso_time(self.created_at),
            "started_at": iso_time(self.started_at),
            "finished_at": iso_time(self.finished_at),
            "next_attempt_at": iso_time(self.next_attempt_at),
            "retry": self.retry.to_dict() if self.retry else None,
        }


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode

MAX_PAGE = 1000
"""The most records one page of a job listing holds."""


CURSOR_PATTERN = "^[0-9a-f]{16}(?:[0-9a-f]{2})*$"
"""A listing cursor: a creation time (a double's 16 hex digits) and a job id (UTF-8 hex).
Any text of this shape is a position, so a cursor is only refused when malformed."""


def _encode_cursor(created_at: float, job_id: str) -> str:
    return struct.pack(">d", created_at).hex() + job_id.encode("utf-8", "replace").hex()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    if len(cursor) < 16 or len(cursor) % 2 or not all(c in "0123456789abcdef" for c in cursor):
        raise ValueError("cursor is not one this server handed out")
    (created_at,) = struct.unpack(">d", bytes.fromhex(cursor[:16]))
    if math.isnan(created_at):
        created_at = math.inf
    # Job ids are valid text without NUL; a hand-made cursor's id is made so (every
    # store can then compare with it).
    return created_at, bytes.fromhex(cursor[16:]).decode("utf-8", "replace").replace("\0", "")


@dataclass(frozen=True, slots=True)
class JobQuery:
    """A filtered, paginated listing of jobs (``GET /v1/jobs``), answered by the store.

    Jobs are ordered by creation time, then id (``order`` ``"asc"``: oldest first); a
    page holds at most ``limit`` records and ends with an opaque cursor when more
    follow. Tags all have to match (``key: value``); ``operation`` matches the payload's
    ``"operation"`` field; ``since`` (inclusive) and ``until`` (exclusive) bound the
    creation time (epoch seconds).

    Raises:
        ValueError: a limit out of 1..1000, an unknown order or a malformed cursor.
    """

    state: JobState | None = None
    tags: tuple[tuple[str, str], ...] = ()
    operation: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    cursor: str | None = None
    order: str = "asc"

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not 1 <= self.limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        if self.order not in ("asc", "desc"):
            raise ValueError("order must be 'asc' or 'desc'")
        if self.cursor is not None:
            _decode_cursor(self.cursor)

    @property
    def descending(self) -> bool:
        return self.order == "desc"

    @property
    def position(self) -> tuple[float, str] | None:
        """The ``(created_at, id)`` the page starts after (before, descending)."""
        return None if self.cursor is None else _decode_cursor(self.cursor)

    def matches(self, record: JobRecord) -> bool:
        """True when the record passes every filter and lies past the cursor."""
        if self.state is not None and record.state is not self.state:
            return False
        if self.since is not None and record.created_at < self.since:
            return False
        if self.until is not None and record.created_at >= self.until:
            return False
        if self.tags:
            tags = record.tags or {}
            if any(tags.get(k) != v for k, v in self.tags):
                return False
        if self.operation is not None:
            payload = record.payload
            if not isinstance(payload, dict) or payload.get("operation") != self.operation:
                return False
        position = self.position
        if position is not None:
            key = (record.created_at, record.id)
            return key < position if self.descending else key > position
        return True

    def page(self, records: Iterable[JobRecord]) -> JobPage:
        """The page of ``records`` (any order, any filter state) this query asks for."""
        ordered = sorted(
            (r for r in records if self.matches(r)),
            key=lambda r: (r.created_at, r.id),
            reverse=self.descending,
        )
        return self.take(ordered)

    def take(self, ordered: list[JobRecord]) -> JobPage:
        """The page from matching records already in the query's order (at least
        ``limit + 1`` of them when more follow)."""
        if len(ordered) <= self.limit:
            return JobPage(ordered, None)
        last = ordered[self.limit - 1]
        return JobPage(ordered[: self.limit], _encode_cursor(last.created_at, last.id))


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of a job listing: records, and the cursor of the next page (None: last)."""

    records: list[JobRecord]
    next_cursor: str | None = None


_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})


class NarrationEvent(NamedTuple):
    """One thing a job said: ``id`` is its per-job sequence number (also the SSE id).

    Immutable; a named tuple because an event is built on every ``narrate()`` and a
    tuple is about four times cheaper to make than a frozen dataclass.
    """

    id: int
    job_id: str
    ts: float
    actor: str
    action: str
    human: str
    fields: Mapping[str, Any] = _NO_FIELDS

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "job_id": self.job_id,
            "ts": iso_time(self.ts),
            "actor": self.actor,
            "action": self.action,
            "human": self.human,
        }
        for key, value in self.fields.items():
            data.setdefault(key, value)
        return data

    @property
    def wire(self) -> str:
        """The event as one line of compact JSON (always an object, never a signal)."""
        return _dumps(self.to_dict())

    def __str__(self) -> str:
        return self.wire
