"""Persistence: batch the registry's changes into its JobStore, and recover on start-up.

The registry itself stays in memory and never waits for the database. A
:class:`Persister` observes every state transition (a dict insert, nothing more) and a
flusher task writes, every ``interval`` seconds or as soon as ``max_batch`` jobs changed,
one :class:`~trio_jobs._store.WriteBatch` holding the changed records, their new history
entries and the events their logs gained since the last flush. Streaming therefore runs at
memory speed; what a crash can lose is the last ``interval`` of changes.

On start the store's jobs are put back in the registry (:func:`recover`): finished jobs
with their logs and signals, queued jobs on the queue, and jobs that were running when the
process died either re-queued (their retry policy allows another attempt) or
``FAILED("interrupted")``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._channel import JobLog
from ._models import JobRecord, JobState, NarrationEvent, Transition
from ._registry import Job, JobRegistry
from ._signals import Signal, TerminalSignal
from ._store import JobStore, JobWrite, StoredJob, WriteBatch, check_json

__all__ = [
    "INTERRUPTED",
    "Persister",
    "open_registry",
    "recover",
    "run_persistence",
]

logger = logging.getLogger("trio_jobs.persist")

INTERRUPTED = "interrupted"
"""The error of a job that was running when its process died."""

_SIGNALS = {
    JobState.COMPLETED: Signal.DONE,
    JobState.FAILED: Signal.ERROR,
    JobState.CANCELLED: Signal.CANCELLED,
}


class _Cursor:
    """What of one job is already in the store."""

    __slots__ = ("events", "inserted", "transitions")

    def __init__(self, transitions: int = 0, events: int = 0, inserted: bool = False) -> None:
        self.transitions = transitions
        self.events = events
        self.inserted = inserted


class Persister:
    """Writes a registry's changes to a store in batches.

    Args:
        registry: the registry to observe.
        store: an open store.
        interval: seconds between flushes while something changes.
        max_batch: flush early once this many jobs changed.
    """

    def __init__(
        self,
        registry: JobRegistry,
        store: JobStore,
        *,
        interval: float = 0.02,
        max_batch: int = 2000,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        self.registry = registry
        self.store = store
        self.interval = interval
        self.max_batch = max_batch
        self._dirty: dict[str, Job] = {}
        self._live: dict[str, Job] = {}
        self._cursors: dict[str, _Cursor] = {}
        self.foreign: set[str] = set()
        """Ids of jobs another node owns: followed here, never written from here."""
        self._idle = trio.lowlevel.ParkingLot()
        self._full = trio.lowlevel.ParkingLot()
        self.flushes = 0
        self.failures = 0

    # ---- called synchronously by the registry -------------------------------------------

    def observe(self, job: Job, transition: Transition) -> None:
        """Registry observer: mark the job changed (and watched while it can narrate)."""
        if self.foreign and job.id in self.foreign:
            return
        dirty = self._dirty
        dirty[job.id] = job
        if transition.state is JobState.RUNNING:
            self._live[job.id] = job
        if self._idle:
            self._idle.unpark_all()
        if len(dirty) >= self.max_batch and self._full:
            self._full.unpark_all()

    def disown(self, job_id: str) -> None:
        """Stop writing a job: another node owns it now."""
        self.foreign.add(job_id)
        self._dirty.pop(job_id, None)
        self._live.pop(job_id, None)
        self._cursors.pop(job_id, None)

    def adopt(self, job: Job, stored: StoredJob, last_event_id: int) -> None:
        """Record that a recovered job's row, history and events are already stored."""
        self.foreign.discard(job.id)
        self._cursors[job.id] = _Cursor(len(stored.history), last_event_id, True)

    # ---- batching ---------------------------------------------------------------------------

    def _collect(self) -> tuple[WriteBatch, list[tuple[Job, _Cursor]]]:
        """Snapshot everything changed since the last flush (synchronously)."""
        dirty, self._dirty = self._dirty, {}
        for job_id, job in self._live.items():
            dirty.setdefault(job_id, job)
        batch = WriteBatch()
        done: list[tuple[Job, _Cursor]] = []
        cap = self.registry.event_log_size
        now_trio = trio.current_time()
        now = time.time()
        cursors = self._cursors
        for job_id, job in dirty.items():
            old = cursors.get(job_id)
            new = _Cursor(old.transitions, old.events, old.inserted) if old else _Cursor()
            history = job.history
            if len(history) > new.transitions or not new.inserted:
                expires = job.expires_at
                batch.jobs.append(
                    JobWrite(
                        job.record(),
                        tuple(history),
                        None if expires is None else now + (expires - now_trio),
                        check_json("payload", job.payload) if not new.inserted else None,
                        check_json("metadata", job.metadata) if not new.inserted else None,
                        first=not new.inserted,
                    )
                )
                new.inserted = True
                new.transitions = len(history)
            log = job.log
            last = log.next_id - 1
            if last > new.events:
                events = batch.events
                for event_id in range(max(new.events + 1, log.first_id), last + 1):
                    events.append(log.get(event_id))
                if last > cap:
                    batch.prune.append((job_id, last - cap))
                new.events = last
            done.append((job, new))
        return batch, done

    def _commit(self, done: list[tuple[Job, _Cursor]]) -> None:
        cursors = self._cursors
        live = self._live
        for job, cursor in done:
            if job.state.is_terminal and job.log.terminal is not None:
                cursors.pop(job.id, None)
                live.pop(job.id, None)
            else:
                cursors[job.id] = cursor
                if job.state is JobState.QUEUED:
                    live.pop(job.id, None)

    def _restore(self, done: list[tuple[Job, _Cursor]]) -> None:
        for job, _ in done:
            self._dirty.setdefault(job.id, job)

    @property
    def pending(self) -> bool:
        """True while something changed that is not stored yet."""
        return bool(self._dirty) or any(
            job.log.next_id - 1 > (c.events if (c := self._cursors.get(job.id)) else 0)
            for job in self._live.values()
        )

    async def flush(self) -> None:
        """Write what changed since the last flush; on failure keep it for the next."""
        batch, done = self._collect()
        if not batch:
            self._commit(done)
            await trio.lowlevel.checkpoint()
            return
        try:
            await self.store.write(batch)
        except BaseException:
            self._restore(done)
            raise
        self._commit(done)
        self.flushes += 1

    async def run(self) -> None:
        """Flush forever: after each change, at most ``interval`` later."""
        while True:
            if not self._dirty and not self._live:
                await self._idle.park()
            with trio.move_on_after(self.interval):
                await self._full.park()
            try:
                await self.flush()
            except Exception:
                self.failures += 1
                logger.exception("writing jobs to %r failed; retrying", self.store)

    async def drain(self, grace: float) -> None:
        """Final flushes on shutdown: shielded, until nothing is pending or running, or
        ``grace`` seconds passed (jobs being cancelled, and a failing store, get that
        long)."""
        with trio.CancelScope(shield=True), trio.move_on_after(grace):
            while True:
                try:
                    await self.flush()
                except Exception:
                    self.failures += 1
                    logger.exception("final write of jobs to %r failed; retrying", self.store)
                else:
                    if not self.pending and not self._live:
                        return
                await trio.sleep(self.interval)


# ---- recovery ---------------------------------------------------------------------------


def _fill_log(log: JobLog, events: list[NarrationEvent]) -> None:
    """Put stored events back into a fresh log, keeping their ids.

    The ring indexes event ``i`` at ``(i - 1) % capacity``; a stored log that no longer
    starts at id 1 (it was pruned) is kept as its newest contiguous run in a ring exactly
    that long, so ids and positions agree.
    """
    if not events:
        return
    if events[0].id == 1 and events[-1].id == len(events) and len(events) <= log._cap:
        for event in events:
            log.replay(event)
        return
    run = [events[-1]]
    for event in reversed(events[:-1]):
        if event.id != run[-1].id - 1 or len(run) >= log._cap:
            break
        run.append(event)
    run.reverse()
    size = len(run)
    buf: list[NarrationEvent] = [run[0]] * size
    for event in run:
        buf[(event.id - 1) % size] = event
    log._buf = buf
    log._cap = size
    log.next_id = run[-1].id + 1


def _restore_job(registry: JobRegistry, stored: StoredJob, events: list[NarrationEvent]) -> Job:
    rec = stored.record
    log = JobLog(rec.id, registry.actor, registry.event_log_size)
    _fill_log(log, events)
    job = Job(
        rec.id,
        rec.payload,
        rec.timeout,
        rec.priority,
        rec.retry,
        dict(rec.tags) or None,
        rec.metadata,
        next(registry._seq),
        log,
    )
    job.created_at = rec.created_at
    job.started_at = rec.started_at
    job.finished_at = rec.finished_at
    job.attempts = rec.attempts
    job.error = rec.error
    job.history = list(stored.history) or [Transition(JobState.QUEUED, rec.created_at)]
    return job


def _interrupted(registry: JobRegistry, job: Job, *, counted: bool) -> None:
    """A job whose process died while it ran (``job.state`` RUNNING or RETRYING): re-queue
    it when its retry policy allows another attempt, else end it FAILED("interrupted").
    ``counted``: the job is already counted in ``registry.running``."""
    policy = job.retry
    if policy is None or job.attempts >= policy.max_attempts:
        if not counted:
            registry.running += 1  # finish() counts it down again
        registry.finish(job, TerminalSignal(Signal.ERROR, INTERRUPTED), INTERRUPTED)
        return
    if counted:
        registry.running -= 1
    job.state = JobState.QUEUED
    job.next_attempt_at = None
    entry = Transition(
        JobState.QUEUED,
        time.time(),
        f"{INTERRUPTED}; re-queued for attempt {job.attempts + 1} of {policy.max_attempts}",
    )
    job.history.append(entry)
    registry._notify(job, entry)


def _close_finished(registry: JobRegistry, job: Job, rec: JobRecord) -> None:
    """Give a restored job its stored terminal state and signal."""
    job.state = rec.state
    sender, job.sender = job.sender, None
    assert sender is not None
    message = rec.error if rec.state is JobState.FAILED else None
    sender.set_outcome(TerminalSignal(_SIGNALS[rec.state], message))
    sender.close()
    if registry.retention is not None:
        now = time.time()
        left = registry.retention - (now - (rec.finished_at or now))
        registry._expiry.append((trio.current_time() + max(0.0, left), rec.id))


def _held_elsewhere(stored: StoredJob, node: str) -> bool:
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
    ``FAILED("interrupted")``; both outcomes are written back to the store.

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
        if rec.id in registry._jobs:
            continue
        if node is not None and _held_elsewhere(stored, node):
            continue
        events = await store.load_events(rec.id, limit=registry.event_log_size)
        job = _restore_job(registry, stored, events)
        if persister is not None:
            persister.adopt(job, stored, events[-1].id if events else 0)
        registry._jobs[rec.id] = job
        restored += 1
        if rec.state.is_terminal:
            _close_finished(registry, job, rec)
            continue
        if rec.state is not JobState.QUEUED:
            job.state = rec.state
            _interrupted(registry, job, counted=False)
            if job.state.is_terminal:
                continue
        elif stored.expires_at is not None:
            job.expires_at = now_trio + (stored.expires_at - now)
            registry._deadlines.append((job.expires_at, job.seq, job))
        registry.requeue(job)
    if restored:
        registry._deadlines.sort()
        registry._expiry = deque(sorted(registry._expiry))
        registry._expiry_lot.unpark_all()
    await trio.lowlevel.checkpoint()
    return restored


# ---- running it -------------------------------------------------------------------------


async def run_persistence(
    registry: JobRegistry,
    store: JobStore | None = None,
    *,
    interval: float = 0.02,
    max_batch: int = 2000,
    grace: float = 5.0,
    task_status: trio.TaskStatus[Persister] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the store, recover its jobs into ``registry``, then persist changes until
    cancelled.

    ``task_status.started(persister)`` is called once recovery is complete, so a runner
    started after it sees the recovered queue. When cancelled, what is still pending is
    written (shielded, for at most ``grace`` seconds, also giving jobs being cancelled that
    long to end) and the store is closed.
    """
    store = store if store is not None else registry.store
    if store is None:
        raise ValueError("no store given and the registry has none")
    if registry._persister is not None:
        raise RuntimeError("the registry is already being persisted")
    registry.store = store
    persister = Persister(registry, store, interval=interval, max_batch=max_batch)
    await store.open()
    registry._persister = persister
    registry.add_observer(persister.observe)
    try:
        try:
            await recover(registry, store, persister, node=getattr(store, "node", None))
            task_status.started(persister)
            await persister.run()
        finally:
            await persister.drain(grace)
            registry.remove_observer(persister.observe)
    finally:
        registry._persister = None
        with trio.CancelScope(shield=True):
            await store.aclose()


@asynccontextmanager
async def open_registry(
    store: JobStore | None = None,
    *,
    interval: float = 0.02,
    grace: float = 5.0,
    **options: Any,
) -> AsyncIterator[JobRegistry]:
    """A :class:`JobRegistry` persisted to ``store`` (recovered from it first).

    ``options`` go to ``JobRegistry``. Without a store this is a plain registry. On exit,
    pending changes are written (for at most ``grace`` seconds) and the store is closed.
    """
    registry = JobRegistry(store=store, **options)
    if store is None:
        await trio.lowlevel.checkpoint()
        yield registry
        return
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_persistence(
                registry, store, interval=interval, grace=grace, task_status=task_status
            )
        )
        try:
            yield registry
        finally:
            nursery.cancel_scope.cancel()
