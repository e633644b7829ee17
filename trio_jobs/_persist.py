"""Persistence: batch the registry's changes into its JobStore, and recover on start-up.

The registry itself stays in memory and never waits for the database. A
:class:`Persister` observes every state transition (a dict insert, nothing more) and a
flusher task writes, every ``interval`` seconds or as soon as ``max_batch`` jobs changed,
one :class:`~trio_jobs._store.WriteBatch` holding the changed records with their history
and the events their logs gained since the last flush. Streaming therefore runs at memory
speed; what a crash can lose is the last ``interval`` of changes.

On start the store's jobs are put back in the registry (:func:`recover`): finished jobs
with their logs and signals, queued jobs on the queue, and jobs that were running when the
process died either re-queued (their retry policy allows another attempt) or
``FAILED("interrupted")``.

:func:`run_shared_jobs` runs several processes (queens) on one PostgreSQL table.
"""

from __future__ import annotations

import bisect
import heapq
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
from ._signals import SIGNAL_OF_STATE, Signal, TerminalSignal
from ._store import JobStore, JobWrite, StoredJob, WriteBatch, check_json

__all__ = [
    "INTERRUPTED",
    "Persister",
    "SharedRunner",
    "open_registry",
    "recover",
    "run_persistence",
    "run_shared_jobs",
]

logger = logging.getLogger("trio_jobs.persist")

INTERRUPTED = "interrupted"
"""The error of a job that was running when its process died."""


class _Cursor:
    """What of one job is already in the store."""

    __slots__ = ("events", "inserted", "transitions")

    def __init__(self, transitions: int = 0, events: int = 0, inserted: bool = False) -> None:
        self.transitions = transitions
        self.events = events
        self.inserted = inserted


class Persister:
    """Writes a registry's changes to a store in batches.

    A job is marked changed by its transitions (the registry's observer) and by the first
    event its log gains after a flush (the log's one-shot ``on_dirty`` hook, re-armed
    when the flush collects the job), so a flush only looks at jobs that changed, and a
    registry whose jobs are all quiet costs nothing: the flusher sleeps.

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
        """Jobs of this node that ran and whose log may still gain events."""
        self._cursors: dict[str, _Cursor] = {}
        self._writing: list[tuple[Job, _Cursor]] = []
        self._lock = trio.Lock()
        self.foreign: set[str] = set()
        """Ids of jobs another node owns: followed here, never written from here."""
        self._idle = trio.lowlevel.ParkingLot()
        self._full = trio.lowlevel.ParkingLot()
        self.flushes = 0
        """Batches written."""
        self.rounds = 0
        """Flushes attempted, written or not (an idle registry adds none)."""
        self.failures = 0

    # ---- called synchronously by the registry and the logs -------------------------------

    def _mark(self, job: Job) -> None:
        dirty = self._dirty
        dirty[job.id] = job
        if self._idle:
            self._idle.unpark_all()
        if len(dirty) >= self.max_batch and self._full:
            self._full.unpark_all()

    def observe(self, job: Job, transition: Transition) -> None:
        """Registry observer: mark the job changed (and watched while it can narrate)."""
        if self.foreign and job.id in self.foreign:
            return
        if transition.state is JobState.RUNNING:
            self._live[job.id] = job
        self._mark(job)

    def _log_changed(self, log: JobLog) -> None:
        """A log's ``on_dirty`` hook: its first event since the job was last collected."""
        if self.foreign and log.job_id in self.foreign:
            return
        job = self.registry._jobs.get(log.job_id)
        if job is not None and job.log is log:
            self._mark(job)

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
        if job.log.terminal is None:
            job.log.on_dirty = self._log_changed

    def stored(self, job_id: str) -> bool:
        """True when the job's row is in the store, or being written, or another node's:
        only a job for which this is False is known to this node alone."""
        if job_id in self.foreign:
            return True
        cursor = self._cursors.get(job_id)
        if cursor is not None and cursor.inserted:
            return True
        return any(job.id == job_id for job, _ in self._writing)

    # ---- batching ---------------------------------------------------------------------------

    def _collect(self) -> tuple[WriteBatch, list[tuple[Job, _Cursor]]]:
        """Snapshot everything changed since the last flush (synchronously), and re-arm
        the changed jobs' logs so their next event marks them again."""
        dirty, self._dirty = self._dirty, {}
        batch = WriteBatch()
        done: list[tuple[Job, _Cursor]] = []
        cap = self.registry.event_log_size
        now_trio = trio.current_time()
        now = time.time()
        cursors = self._cursors
        hook = self._log_changed
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
            if log.terminal is None:
                log.on_dirty = hook
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
        return bool(self._dirty or self._writing)

    async def flush(self) -> None:
        """Write what changed since the last flush; on failure keep it for the next.
        Flushes run one at a time, in the order they are called."""
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        self.rounds += 1
        batch, done = self._collect()
        if not batch:
            self._commit(done)
            await trio.lowlevel.checkpoint()
            return
        self._writing = done
        try:
            await self.store.write(batch)
        except BaseException:
            self._restore(done)
            raise
        finally:
            self._writing = []
        self._commit(done)
        self.flushes += 1

    async def run(self) -> None:
        """Flush forever: after each change, at most ``interval`` later; asleep while
        nothing changed. A failing store is retried with exponential backoff (up to
        5 s); nothing is dropped meanwhile."""
        failing = 0
        while True:
            if not self._dirty:
                await self._idle.park()
            if failing:
                await trio.sleep(min(5.0, self.interval * 2**failing))
            else:
                with trio.move_on_after(self.interval):
                    await self._full.park()
            try:
                await self.flush()
            except Exception:
                self.failures += 1
                failing = min(failing + 1, 16)
                logger.exception("writing jobs to %r failed; retrying", self.store)
            else:
                failing = 0

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


def _fill_log(log: JobLog, events: list[NarrationEvent], *, closed: bool = False) -> None:
    """Put stored events back into a fresh log, keeping their ids and its capacity.

    The ring indexes event ``i`` at ``(i - 1) % capacity``. A stored log that no longer
    starts at id 1 (it was pruned) is kept as its newest contiguous run (at most the
    capacity), placed at those positions in a full-size ring whose floor hides the empty
    slots, so a job that runs again keeps ``event_log_size`` events. A log that will never
    grow (``closed``: the job is finished) gets a ring exactly as long as the run instead.
    """
    if not events:
        return
    cap = log._cap
    if events[0].id == 1 and events[-1].id == len(events) and len(events) <= cap:
        for event in events:
            log.replay(event)
        return
    run = [events[-1]]
    for event in reversed(events[:-1]):
        if event.id != run[-1].id - 1 or len(run) >= cap:
            break
        run.append(event)
    run.reverse()
    size = len(run) if closed else cap
    buf: list[NarrationEvent] = [run[0]] * size
    for event in run:
        buf[(event.id - 1) % size] = event
    log._buf = buf
    log._cap = size
    log._floor = run[0].id
    log.next_id = run[-1].id + 1


def _restore_job(registry: JobRegistry, stored: StoredJob, events: list[NarrationEvent]) -> Job:
    rec = stored.record
    log = JobLog(rec.id, registry.actor, registry.event_log_size)
    _fill_log(log, events, closed=rec.state.is_terminal)
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


def _close_finished(
    registry: JobRegistry, job: Job, rec: JobRecord, *, fresh_retention: bool = False
) -> None:
    """Give a restored job its stored terminal state and signal; it stays in memory for
    what is left of its retention, or a whole retention when it was asked for again."""
    job.state = rec.state
    sender, job.sender = job.sender, None
    assert sender is not None
    message = rec.error if rec.state is JobState.FAILED else None
    sender.set_outcome(TerminalSignal(SIGNAL_OF_STATE[rec.state], message))
    sender.close()
    if registry.retention is not None:
        now = time.time()
        left = registry.retention
        if not fresh_retention:
            left -= now - (rec.finished_at or now)
        bisect.insort(registry._expiry, (trio.current_time() + max(0.0, left), rec.id))


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


async def load_stored(registry: JobRegistry, job_id: str) -> bool:
    """:meth:`JobRegistry.load`: restore a finished job from the store (or follow it
    through the shared runner)."""
    if registry._follow is not None:
        return await registry._follow(job_id)
    store, persister = registry.store, registry._persister
    if store is None or persister is None:
        await trio.lowlevel.checkpoint()
        return False
    stored = await store.load_job(job_id)
    if stored is None or not stored.record.state.is_terminal:
        return job_id in registry._jobs
    events = await store.load_events(job_id, limit=registry.event_log_size)
    if job_id in registry._jobs:  # loaded meanwhile
        return True
    job = _restore_job(registry, stored, events)
    registry._jobs[job_id] = job
    _close_finished(registry, job, stored.record, fresh_retention=True)
    registry._expiry_lot.unpark_all()
    return True


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


# ---- several queens on one PostgreSQL store ---------------------------------------------


class SharedRunner:
    """Runs a registry's share of the jobs in a PostgreSQL table shared by several nodes.

    Made by :func:`run_shared_jobs`. Every ``poll_interval`` it:

    - claims queued jobs (``FOR UPDATE SKIP LOCKED``) up to its free capacity and runs
      them here, loading those submitted to other nodes into this registry;
    - takes over jobs whose owner's lease ran out (the owner died): they are re-queued or
      end ``FAILED("interrupted")`` as in restart recovery;
    - follows jobs of this registry that another node runs (their state and events are
      copied here, so ``get``/``subscribe`` work on any node) and forwards their cancels:
      a job this node does not run is never ended here by a cancel, it is asked of the
      store, and the job ends CANCELLED here only if it was still unclaimed (this node
      then takes it and writes its end); else its owner decides and this node follows;
    - cancels its own jobs that another node asked to cancel;
    - renews the leases of its jobs (every third of ``lease``).
    """

    def __init__(
        self,
        registry: JobRegistry,
        store: Any,
        persister: Persister,
        executor: Any,
        *,
        max_concurrent: int | None,
        poll_interval: float,
        lease: float,
        claim: bool = True,
    ) -> None:
        self.registry = registry
        self.claim = claim
        self.store = store
        self.persister = persister
        self.executor = executor
        self.max_concurrent = max_concurrent
        self.poll_interval = poll_interval
        self.lease = lease
        self.here: set[str] = set()
        """Jobs this node claimed and runs (or ran)."""
        self.running_here = 0
        self._cancel_queue: list[str] = []
        """Cancels asked here of jobs that may be held elsewhere, not yet sent."""
        self._cancelling: set[str] = set()
        """Sent cancels whose jobs have not ended here yet."""
        self._next_beat = 0.0
        self._wake = trio.Event()
        registry.add_observer(self._observe)

    def _observe(self, job: Job, transition: Transition) -> None:
        if transition.state is JobState.QUEUED and job.id not in self.here:
            self._wake.set()  # a new job: claim it without waiting for the next poll

    def _cancel_elsewhere(self, job: Job) -> bool:
        """The registry's cancel hook: True (the cancel is forwarded, not decided here)
        for a job this node does not run and another node may hold: one whose row is
        stored. A job no other node can have seen yet is cancelled here as usual."""
        if job.id in self.here or not self.persister.stored(job.id):
            return False
        self._cancel_queue.append(job.id)
        self._wake.set()
        return True

    def _followed(self) -> dict[str, int]:
        """Jobs in this registry that may run elsewhere, with their last local event id."""
        out: dict[str, int] = {}
        for _, _, job in self.registry._queue:
            if job.state is JobState.QUEUED and job.id not in self.here:
                out[job.id] = job.log.next_id - 1
        for job_id in self.persister.foreign:
            mirror = self.registry._jobs.get(job_id)
            if mirror is not None and not mirror.state.is_terminal:
                out[job_id] = mirror.log.next_id - 1
        return out

    async def _load(self, stored: StoredJob) -> Job:
        """The registry's job for a row this node just took, restored if it is not here."""
        registry = self.registry
        job = registry._jobs.get(stored.record.id)
        if job is None:
            events = await self.store.load_events(stored.record.id, limit=registry.event_log_size)
            job = _restore_job(registry, stored, events)
            registry._jobs[job.id] = job
            self.persister.adopt(job, stored, events[-1].id if events else 0)
            return job
        if job.id in self.persister.foreign:
            await self._sync(job, stored, await self._events_after(job))
            job.history = list(stored.history)
        self.persister.adopt(job, stored, job.log.next_id - 1)
        return job

    async def _events_after(self, job: Job) -> list[NarrationEvent]:
        events: list[NarrationEvent] = await self.store.load_events(
            job.id, after=job.log.next_id - 1
        )
        return events

    async def _sync(self, job: Job, stored: StoredJob, events: list[NarrationEvent]) -> None:
        """Copy another node's view of a job into this registry's copy."""
        await trio.lowlevel.checkpoint()
        log = job.log
        for event in events:
            if event.id == log.next_id and log.terminal is None:
                log.append(event.action, event.human, event.fields, event.ts, event.actor)
        rec = stored.record
        if job.state.is_terminal:
            return
        registry = self.registry
        job.attempts = rec.attempts
        job.started_at = rec.started_at
        job.next_attempt_at = rec.next_attempt_at
        if rec.state.is_terminal:
            message = rec.error if rec.state is JobState.FAILED else None
            reason = stored.history[-1].reason if stored.history else None
            registry.finish(job, TerminalSignal(SIGNAL_OF_STATE[rec.state], message), reason)
            job.finished_at = rec.finished_at
            job.history = list(stored.history)
        elif rec.state is not job.state:
            if job.state is JobState.QUEUED:
                registry.transition(job, rec.state, "running on another node")
            else:
                job.state = rec.state
            job.history = list(stored.history)

    async def follow(self, job_id: str) -> bool:
        """Make a job created on another node known here (``get``, ``subscribe`` and
        ``cancel_job`` then work on it); False if the store has no such job."""
        registry = self.registry
        if job_id in registry._jobs:
            await trio.lowlevel.checkpoint()
            return True
        stored = await self.store.load_job(job_id)
        if stored is None:
            return False
        events = await self.store.load_events(job_id, limit=registry.event_log_size)
        if job_id in registry._jobs:  # loaded meanwhile
            return True
        job = _restore_job(registry, stored, events)
        registry._jobs[job_id] = job
        rec = stored.record
        if rec.state.is_terminal:
            _close_finished(registry, job, rec)
            return True
        self.persister.disown(job_id)
        if rec.state is not JobState.QUEUED:
            job.state = rec.state
            registry.running += 1  # a mirror is counted while it runs, as in _sync()
        self._wake.set()
        return True

    async def _start(self, nursery: trio.Nursery, stored: StoredJob) -> None:
        job_id = stored.record.id
        if job_id in self.here:
            return
        job = await self._load(stored)
        if job.state is not JobState.QUEUED:
            return
        if job.cancel_requested:  # cancelled here before the request went out: it is ours
            self._cancelled_here(job)
            return
        self.here.add(job_id)
        self.running_here += 1
        nursery.start_soon(self._run_one, job_id)

    async def _run_one(self, job_id: str) -> None:
        from ._runner import run_job

        try:
            await run_job(self.registry, job_id, self.executor)
        finally:
            self.running_here -= 1
            self._wake.set()

    async def _take_over(self, stored: StoredJob) -> None:
        registry = self.registry
        job = await self._load(stored)
        if job.state.is_terminal:
            return
        # a mirror synced to RUNNING/RETRYING is counted in registry.running; a job just
        # restored from the row (QUEUED in memory) is not
        counted = job.state in (JobState.RUNNING, JobState.RETRYING)
        if not counted:
            job.state = stored.record.state
        _interrupted(registry, job, counted=counted)

    def _prune_queue(self) -> None:
        """Nobody pops this registry's local queue in shared mode: drop what left it."""
        queue = self.registry._queue
        if len(queue) > 64:
            kept = [e for e in queue if e[2].state is JobState.QUEUED and e[2].id not in self.here]
            if len(kept) < len(queue):
                heapq.heapify(kept)
                self.registry._queue = kept

    async def run(self, nursery: trio.Nursery) -> None:
        """Poll forever; database errors are logged and retried with backoff (up to
        the lease time), so a database outage pauses the node instead of ending it."""
        failing = 0
        while True:
            self._wake = trio.Event()
            try:
                await self._round(nursery)
            except Exception:
                failing = min(failing + 1, 16)
                logger.exception("shared job round on %r failed; retrying", self.store)
                await trio.sleep(min(self.lease / 3, self.poll_interval * 2**failing))
                continue
            failing = 0
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()

    def _cancelled_here(self, job: Job) -> None:
        self._cancelling.discard(job.id)
        reason = job.cancel_reason or "cancelled while queued"
        self.registry.finish(job, TerminalSignal(Signal.CANCELLED), reason)

    async def _cancels(self) -> None:
        """Send the cancels asked here, and end those of jobs nobody claimed: this node
        takes them (so no other node can) and writes their end."""
        registry = self.registry
        if self._cancel_queue:
            asked, self._cancel_queue = self._cancel_queue, []
            await self.persister.flush()  # the rows must be there to carry the request
            await self.store.request_cancel(asked)
            self._cancelling.update(asked)
        for job_id in list(self._cancelling):
            job = registry._jobs.get(job_id)
            if job is None or job.state.is_terminal:
                self._cancelling.discard(job_id)
        if not self._cancelling:
            return
        for stored in await self.store.take_cancelled(list(self._cancelling), self.lease):
            job = registry._jobs.get(stored.record.id)
            if job is None:
                continue
            self.persister.adopt(job, stored, job.log.next_id - 1)
            if job.state.is_terminal:
                self.persister.observe(job, job.history[-1])
            else:
                self._cancelled_here(job)

    async def _round(self, nursery: trio.Nursery) -> None:
        store = self.store
        await self._cancels()
        free = 64 if self.max_concurrent is None else self.max_concurrent - self.running_here
        if free > 0 and self.claim:
            if self.persister._dirty:
                await self.persister.flush()  # new jobs are claimable once written
            for stored in await store.claim(free, self.lease):
                await self._start(nursery, stored)
        if self.claim:
            for stored in await store.take_over(16, self.lease):
                await self._take_over(stored)
        for job_id in await store.cancel_requests():
            if job_id in self.here:
                self.registry.cancel_job(job_id, "cancelled through another node")
        followed = self._followed()
        if followed:
            for stored, events in await store.poll(followed):
                job = self.registry._jobs.get(stored.record.id)
                if job is None:
                    continue
                if job.id not in self.persister.foreign:
                    self.persister.disown(job.id)
                await self._sync(job, stored, events)
        now = trio.current_time()
        if now >= self._next_beat:
            await store.heartbeat(self.lease)
            self._next_beat = now + self.lease / 3
        self._prune_queue()


async def run_shared_jobs(
    registry: JobRegistry,
    executor: Any,
    *,
    max_concurrent: int | None = None,
    poll_interval: float = 0.05,
    lease: float = 10.0,
    claim: bool = True,
    task_status: trio.TaskStatus[SharedRunner] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run jobs of a PostgreSQL table shared by several nodes (queens), until cancelled.

    Use instead of :func:`run_jobs` when several processes share one
    ``PostgresStore(dsn, node=<unique name>)``: jobs created on any node are claimed
    through the database, so each runs exactly once, on whichever node has a free slot;
    a node's ``get``/``subscribe``/``cancel_job`` keep working for the jobs it created
    even when another node runs them; a node that dies (no lease renewal for ``lease``
    seconds) leaves its jobs to the others, which re-queue or fail them as restart
    recovery does. Persistence is started here if it is not running yet. When cancelled,
    this node's running jobs end ``[CANCELLED]`` and are written.

    ``claim=False`` makes a node that submits and follows jobs but runs none.
    ``task_status.started()`` hands out the :class:`SharedRunner` (its :meth:`follow`
    loads a job created elsewhere).
    """
    store = registry.store
    if store is None or getattr(store, "node", None) is None:
        raise ValueError("run_shared_jobs needs a registry with PostgresStore(node=...)")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1 or None")
    # Persistence must outlive this node's jobs (their final states are written after
    # they end) and the loop using the store: it is shielded from the caller's cancel
    # and stopped explicitly once both are done.
    persistence = trio.CancelScope(shield=True)

    async def persist(task_status: trio.TaskStatus[Persister]) -> None:
        with persistence:
            await run_persistence(registry, task_status=task_status)

    from ._runner import _sweep

    async with trio.open_nursery() as outer:
        persister = registry._persister
        if persister is None:
            persister = await outer.start(persist)
        if not registry._sweeping:
            registry._sweeping = True
            outer.start_soon(_sweep, registry)
        assert persister is not None
        shared = SharedRunner(
            registry,
            store,
            persister,
            executor,
            max_concurrent=max_concurrent,
            poll_interval=poll_interval,
            lease=lease,
            claim=claim,
        )
        registry._follow = shared.follow
        registry._cancel_elsewhere = shared._cancel_elsewhere
        try:
            async with trio.open_nursery() as jobs:
                task_status.started(shared)
                await shared.run(jobs)
        finally:
            registry._follow = None
            registry._cancel_elsewhere = None
            registry.remove_observer(shared._observe)
            persistence.cancel()
