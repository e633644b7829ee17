"""MemoryStore: a store in a dict (the library default; recovery tests in one process)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from .._json import dumps, loads
from .._models import NarrationEvent
from ._base import JobStore, Member, StoredJob, WriteBatch
from ._rows import event_chunks, events_from_chunks, job_row, stored_job_from_row

__all__ = ["MemoryStore"]


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
        self._members: dict[tuple[str, str], Member] = {}

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
                reserved = max(old.stored.reserved_id, new.reserved_id)
                old.stored = dataclasses.replace(new, record=record, reserved_id=reserved)
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

    async def put_member(
        self, kind: str, key: str, data: dict[str, Any], *, node: str | None = None
    ) -> None:
        self._check()
        await trio.lowlevel.checkpoint()
        self._members[kind, key] = Member(kind, key, loads(dumps(data)), time.time(), node)

    async def drop_member(self, kind: str, key: str) -> None:
        self._check()
        await trio.lowlevel.checkpoint()
        self._members.pop((kind, key), None)

    async def members(self, kind: str, *, seen_since: float | None = None) -> list[Member]:
        self._check()
        await trio.lowlevel.checkpoint()
        out = [
            m
            for m in self._members.values()
            if m.kind == kind and (seen_since is None or m.seen_at >= seen_since)
        ]
        out.sort(key=lambda m: m.seen_at)
        return out
