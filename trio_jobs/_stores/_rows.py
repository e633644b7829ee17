"""Rows: how a job, its history and its events are laid out in a store (JSON columns).

Shared by the SQL stores and the in-memory one, which round-trips through the same rows
so that what a test reads back is what a database would give.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from .._json import dumps, loads
from .._models import JobRecord, JobState, NarrationEvent, Priority, Transition
from ._base import JobWrite, StoredJob, retry_from_json, retry_to_json

__all__ = [
    "JOB_COLUMNS",
    "MUTABLE_COLUMNS",
    "N_JOB_COLUMNS",
    "event_chunks",
    "events_from_chunks",
    "job_row",
    "job_update_row",
    "stored_job_from_row",
    "update_set",
    "upsert_set",
]

JOB_COLUMNS = (
    "id, state, error, payload, timeout, priority, retry, tags, metadata, attempts, "
    "created_at, started_at, finished_at, next_attempt_at, expires_at, history, reserved_id"
)
N_JOB_COLUMNS = 17
MUTABLE_COLUMNS = (
    "state",
    "error",
    "attempts",
    "started_at",
    "finished_at",
    "next_attempt_at",
    "expires_at",
    "history",
    "reserved_id",
)


def upsert_set(excluded: str, greatest: str) -> str:
    """The ``DO UPDATE SET`` list of a job upsert (``reserved_id`` only ever grows)."""
    return ", ".join(
        f"reserved_id = {greatest}(jobs.reserved_id, {excluded}.reserved_id)"
        if c == "reserved_id"
        else f"{c} = {excluded}.{c}"
        for c in MUTABLE_COLUMNS
    )


def update_set(greatest: str, param: str) -> str:
    """The ``SET`` list of an ``UPDATE`` of a job's later write (:func:`job_update_row`)."""
    return ", ".join(
        f"reserved_id = {greatest}(reserved_id, {param})"
        if c == "reserved_id"
        else f"{c} = {param}"
        for c in MUTABLE_COLUMNS
    )


def job_update_row(write: JobWrite) -> tuple[Any, ...]:
    """The parameters of ``UPDATE jobs SET <update_set> WHERE id = ?`` for a later write
    (not ``first``): the mutable columns, then the id."""
    rec = write.record
    return (
        rec.state.value,
        None if rec.error is None else dumps(rec.error),
        rec.attempts,
        rec.started_at,
        rec.finished_at,
        rec.next_attempt_at,
        write.expires_at,
        dumps([(t.state.value, t.at, t.reason) for t in write.history]),
        write.reserved_id,
        rec.id,
    )


def job_row(write: JobWrite) -> tuple[Any, ...]:
    rec = write.record
    tags = dumps(dict(rec.tags)) if write.first and rec.tags else None
    return (
        rec.id,
        rec.state.value,
        None if rec.error is None else dumps(rec.error),
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
        write.reserved_id,
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
        reserved_id,
    ) = row
    record = JobRecord(
        id=job_id,
        state=JobState(state),
        error=_loads(error),
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
    return StoredJob(
        record, transitions, expires_at, owner, bool(cancel_requested), reserved_id or 0
    )


def _plain(value: Any) -> Any:
    """The JSON hook of :func:`event_chunks`: a mapping that is not a dict (an event's
    fields may be any mapping) as a dict, anything else JSON cannot hold as its ``str``,
    as on the wire."""
    return dict(value) if isinstance(value, Mapping) else str(value)


try:
    import orjson

    _orjson_dumps: Any = orjson.dumps
    _ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS
except ImportError:  # pragma: no cover - orjson is a dependency
    _orjson_dumps = None
    _ORJSON_OPTIONS = 0

_std_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=_plain).encode
_ID, _TS, _ACTOR, _ACTION, _HUMAN, _FIELDS = (itemgetter(i) for i in (0, 2, 3, 4, 5, 6))


def _column(events: Sequence[NarrationEvent], field: itemgetter[Any]) -> Any:
    """A column of strings, or its one value when all events have the same."""
    values = list(map(field, events))
    one = values[0]
    return one if values.count(one) == len(values) else values


def _encode_events(events: Sequence[NarrationEvent]) -> str:
    """One run of a job's events as a JSON object of columns: ``id`` (the first id when
    the ids are consecutive, else all of them), ``ts``, ``actor`` and ``action`` (one
    string when all events have the same), ``human``, ``fields``. Columns are built by
    C-level ``map``s: no Python code and no new object per event (a list of 200,000
    short-lived tuples also cost full garbage collections), and the text is a third
    shorter than rows of items."""
    first, last = events[0][0], events[-1][0]
    columns = {
        "id": first if last - first == len(events) - 1 else list(map(_ID, events)),
        "ts": list(map(_TS, events)),
        "actor": _column(events, _ACTOR),
        "action": _column(events, _ACTION),
        "human": list(map(_HUMAN, events)),
        "fields": list(map(_FIELDS, events)),
    }
    if _orjson_dumps is not None:
        try:
            text: bytes = _orjson_dumps(columns, default=_plain, option=_ORJSON_OPTIONS)
            return text.decode()
        except TypeError:  # lone surrogates, integers past 64 bits: the standard library
            pass
    return _std_dumps(columns)


def _decode_events(job_id: str, chunk: str) -> Iterable[NarrationEvent]:
    """Read :func:`_encode_events` back, and the rows of items ``[id, ts, actor, action,
    human, fields]`` that earlier versions wrote."""
    data = loads(chunk)
    if not isinstance(data, dict):
        for event_id, ts, actor, action, human, fields in data:
            yield NarrationEvent(event_id, job_id, ts, actor, action, human, fields or {})
        return
    ts = data["ts"]
    ids = data["id"]
    if isinstance(ids, int):
        ids = range(ids, ids + len(ts))
    actors, actions = data["actor"], data["action"]
    if isinstance(actors, str):
        actors = itertools.repeat(actors)
    if isinstance(actions, str):
        actions = itertools.repeat(actions)
    for event_id, at, actor, action, human, fields in zip(
        ids, ts, actors, actions, data["human"], data["fields"], strict=False
    ):
        yield NarrationEvent(event_id, job_id, at, actor, action, human, fields or {})


def event_chunks(events: Sequence[NarrationEvent]) -> list[tuple[str, int, int, str]]:
    """Rows ``(job_id, first_id, last_id, events_json)``: one per run of a job's events
    (each job's events come in one run, so a batch whose first and last event are of the
    same job is that job's run)."""
    if not events:
        return []
    first, last = events[0], events[-1]
    if first.job_id == last.job_id:
        return [(first.job_id, first.id, last.id, _encode_events(events))]
    rows: list[tuple[str, int, int, str]] = []
    for job_id, group in itertools.groupby(events, key=lambda e: e.job_id):
        run = list(group)
        rows.append((job_id, run[0].id, run[-1].id, _encode_events(run)))
    return rows


def events_from_chunks(
    job_id: str, chunks: Iterable[str], after: int, limit: int | None
) -> list[NarrationEvent]:
    """The events with id > ``after`` (the newest ``limit``) in chunks, oldest first."""
    out: dict[int, NarrationEvent] = {}
    for chunk in chunks:
        for event in _decode_events(job_id, chunk):
            if event.id > after:
                out[event.id] = event
    events = [out[i] for i in sorted(out)]
    return events[-limit:] if limit is not None else events
