"""Recovery: put a store's jobs back into a registry on start-up, and load finished jobs
that retention dropped from memory. Jobs come back only through ``JobRegistry.restore``
and move only through ``Job``'s own methods."""

from __future__ import annotations

import time

import trio

from .._job import Job
from .._models import JobState
from .._registry import JobRegistry
from .._stores._base import JobStore, StoredJob
from ._writer import Persister

__all__ = ["held_elsewhere", "load_finished", "recover"]


def held_elsewhere(stored: StoredJob, node: str) -> bool:
    """True when another node holds the unfinished job (or it runs without an owner)."""
    state = stored.record.state
    if state.is_terminal or stored.owner == node:
        return False
    return not (state is JobState.QUEUED and stored.owner is None)


async def recover(
    registry: JobRegistry,
    store: JobStore,
    persister: Persister | None,
    *,
    node: str | None = None,
) -> int:
    """Put the store's jobs back into ``registry``; return how many were restored.

    Jobs already in the registry are left alone. Finished jobs whose retention has run out
    stay in the store only (:meth:`JobRegistry.fetch` still finds them). Jobs that were
    running are re-queued when their retry policy allows another attempt, else they end
    ``FAILED("interrupted")``; both outcomes are written back to the store. Event ids the
    dead process may have handed out are never issued again (see ``Job.restore``).

    With ``node`` (several queens share the store), unfinished jobs held by other nodes,
    or running without an owner, are left to :func:`run_shared_jobs` (which follows them
    or takes them over when their owner's lease runs out).
    """
    since = None if registry.retention is None else time.time() - registry.retention
    stored_jobs = await store.load_jobs(finished_since=since)
    restored = 0
    now_trio = trio.current_time()
    now = time.time()
    for stored in stored_jobs:
        rec = stored.record
        if rec.id in registry:
            continue
        if node is not None and held_elsewhere(stored, node):
            continue
        events = await store.load_events(rec.id, limit=registry.event_log_size)
        job = registry.restore(stored, events)
        if persister is not None:
            persister.adopt(job, stored, events[-1].id if events else 0)
        restored += 1
        if rec.state.is_terminal:
            registry.keep_finished(job)
            continue
        if rec.state is not JobState.QUEUED:
            job.interrupt()
            if job.state.is_terminal:
                continue
        elif stored.expires_at is not None:
            registry.queue_deadline(job, now_trio + (stored.expires_at - now))
        registry.requeue(job)
    await trio.lowlevel.checkpoint()
    return restored


async def load_finished(registry: JobRegistry, store: JobStore, job_id: str) -> Job | None:
    """Restore a finished job from the store for a whole new retention; None when the
    store has no such finished job."""
    found = await store.load_job_and_events(job_id, limit=registry.event_log_size)
    if found is None or not found[0].record.state.is_terminal:
        return registry.job(job_id)
    stored, events = found
    job = registry.job(job_id)
    if job is not None:  # loaded meanwhile
        return job
    job = registry.restore(stored, events)
    registry.keep_finished(job, fresh=True)
    return job
