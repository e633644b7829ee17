"""MemoryStore: a store in a dict (the library default; recovery tests in one process)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import trio

from .._models import NarrationEvent
from ._base import JobStore, StoredJob, WriteBatch
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
