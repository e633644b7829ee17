"""JobRegistry: creates, looks up, lists, cancels and retires jobs."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ._channel import JobLog, JobStream, LogSender
from ._exceptions import InvalidJobState, JobNotFound
from ._models import JobRecord, JobState, Priority, RetryPolicy, Transition
from ._signals import STATE_OF_SIGNAL, Signal, TerminalSignal

if TYPE_CHECKING:
    from ._persist import Persister
    from ._store import JobStore

__all__ = ["JobRegistry", "Job", "TransitionObserver"]

logger = logging.getLogger("trio_jobs.registry")

TransitionObserver = Callable[["Job", Transition], None]


class Job:
    """The registry's mutable view of one job; callers get frozen ``JobRecord`` snapshots."""

    __slots__ = (
        "__weakref__",
        "attempts",
        "cancel_reason",
        "cancel_requested",
        "created_at",
        "error",
        "expires_at",
        "finished_at",
        "history",
        "id",
        "log",
        "metadata",
        "next_attempt_at",
        "payload",
        "priority",
        "retry",
        "scope",
        "sender",
        "seq",
        "started_at",
        "state",
        "tags",
        "timeout",
    )

    def __init__(
        self,
        job_id: str,
        payload: Any,
        timeout: float | None,
        priority: Priority,
        retry: RetryPolicy | None,
        tags: dict[str, str] | None,
        metadata: Any,
        seq: int,
        log: JobLog,
    ) -> None:
        self.id = job_id
        self.state = JobState.QUEUED
        self.error: str | None = None
        self.payload = payload
        self.timeout = timeout
        self.priority = priority
        self.retry = retry
        self.tags = tags
        self.metadata = metadata
        self.attempts = 0
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.next_attempt_at: float | None = None
        self.expires_at: float | None = None
        self.seq = seq
        self.log = log
        self.sender: LogSender | None = log.sender()
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False
        self.cancel_reason: str | None = None
        self.history: list[Transition] = [Transition(JobState.QUEUED, self.created_at)]

    def __lt__(self, other: Job) -> bool:
        return self.seq < other.seq

    def record(self) -> JobRecord:
        return JobRecord(
            id=self.id,
            state=self.state,
            error=self.error,
            payload=self.payload,
            timeout=self.timeout,
            priority=self.priority,
            tags=dict(self.tags or {}),
            metadata=self.metadata,
            attempts=self.attempts,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            retry=self.retry,
            next_attempt_at=self.next_attempt_at,
        )


def _parse_tag(tag: str | tuple[str, str] | Mapping[str, str] | None) -> dict[str, str]:
    if tag is None:
        return {}
    if isinstance(tag, Mapping):
        return dict(tag)
    if isinstance(tag, tuple):
        return {tag[0]: tag[1]}
    key, sep, value = tag.partition(":")
    if not sep:
        raise ValueError(f"tag filter must look like key:value, got {tag!r}")
    return {key: value}


def _check_storable(payload: Any, metadata: Any) -> None:
    from ._store import check_json

    check_json("payload", payload)
    check_json("metadata", metadata)


class JobRegistry:
    """Every job of one process: create, look up, list, cancel, subscribe.

    Jobs are run by :func:`open_job_runner` (or :func:`run_jobs`), which takes queued jobs
    highest priority first, FIFO within a priority. Finished jobs stay queryable for
    ``retention`` seconds (trio time; None keeps them forever), then leave memory.

    Args:
        actor: the default ``actor`` of narration events of this registry's jobs.
        retention: seconds a finished job stays in memory.
        event_log_size: events retained per job for late subscribers and resumes.
        store: a :class:`~trio_jobs.JobStore` the registry is persisted to and recovered
            from once persistence runs (:func:`run_jobs` starts it, or
            :func:`open_registry`); payloads and metadata must then be JSON-serialisable.
    """

    def __init__(
        self,
        *,
        actor: str = "trio-jobs",
        retention: float | None = 600.0,
        event_log_size: int = 10_000,
        store: JobStore | None = None,
    ) -> None:
        if event_log_size < 1:
            raise ValueError("event_log_size must be >= 1")
        if retention is not None and retention < 0:
            raise ValueError("retention must be >= 0 or None")
        self.actor = actor
        self.retention = retention
        self.event_log_size = event_log_size
        self._jobs: dict[str, Job] = {}
        self._jobs_peak = 0
        self._queue: list[tuple[int, int, Job]] = []
        self._queue_lot = trio.lowlevel.ParkingLot()
        self._expiry: deque[tuple[float, str]] = deque()
        self._expiry_lot = trio.lowlevel.ParkingLot()
        self._deadlines: list[tuple[float, int, Job]] = []
        self._sweep_deadline = math.inf
        self._seq = itertools.count()
        self._observers: list[TransitionObserver] = []
        self.running = 0
        self._sweeping = False
        self.store = store
        self._persister: Persister | None = None
        self._follow: Callable[[str], Awaitable[bool]] | None = None
        self._cancel_elsewhere: Callable[[Job], bool] | None = None
        """Shared mode: True when a job may be held by another node (its cancel is then
        forwarded there, and its outcome comes from the store)."""

    # ---- creating and reading -------------------------------------------------------

    def create_job(
        self,
        payload: Any = None,
        *,
        timeout: float | None = None,
        priority: Priority | str | int = Priority.NORMAL,
        retry: RetryPolicy | None = None,
        tags: Mapping[str, str] | None = None,
        metadata: Any = None,
        expires: float | None = None,
        job_id: str | None = None,
        enqueue: bool = True,
    ) -> str:
        """Queue a new job and return its id (``job-<uuid4>``).

        Args:
            payload: handed to the executor as is.
            timeout: seconds each attempt may run before it fails with
                ``Job timed out after <N>s``.
            priority: ``low``, ``normal``, ``high`` or ``critical``.
            retry: how failed attempts are retried (None: never).
            tags: str -> str labels, filterable in :meth:`list_jobs`.
            metadata: any JSON-ready value kept with the record.
            expires: seconds the job may wait in the queue; after that it fails unrun.
            job_id: use this id instead of a new one (it must be unused).
            enqueue: False keeps the job off the runners' queue, for a caller that runs
                it itself with :func:`run_job`.

        Raises:
            ValueError: an option is out of range.
        """
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if expires is not None and not expires > 0:
            raise ValueError(f"expires must be a positive number of seconds, got {expires!r}")
        prio = Priority.parse(priority)
        tag_map: dict[str, str] | None = None
        if tags:
            tag_map = {}
            for key, value in tags.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise ValueError("tags must map str to str")
                tag_map[key] = value
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ValueError("retry must be a RetryPolicy")
        if self.store is not None:
            _check_storable(payload, metadata)
        job_id = job_id or f"job-{uuid.uuid4()}"
        if job_id in self._jobs:
            raise ValueError(f"job id already exists: {job_id}")
        self._purge()
        log = JobLog(job_id, self.actor, self.event_log_size)
        job = Job(job_id, payload, timeout, prio, retry, tag_map, metadata, next(self._seq), log)
        if expires is not None:
            job.expires_at = trio.current_time() + expires
            heapq.heappush(self._deadlines, (job.expires_at, job.seq, job))
        self._jobs[job_id] = job
        if len(self._jobs) > self._jobs_peak:
            self._jobs_peak = len(self._jobs)
        self._notify(job, job.history[0])
        if enqueue:
            heapq.heappush(self._queue, (-prio, job.seq, job))
            if self._queue_lot:
                self._queue_lot.unpark()
        if job.expires_at is not None and job.expires_at < self._sweep_deadline:
            self._expiry_lot.unpark_all()
        return job_id

    def _job(self, job_id: str) -> Job:
        if self._expiry:
            self._purge_if_in_trio()
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> JobRecord:
        """The job's current record. Raises :class:`JobNotFound`."""
        return self._job(job_id).record()

    async def fetch(self, job_id: str) -> JobRecord:
        """Like :meth:`get`, but a job that retention dropped from memory is read from
        the store (while it is being persisted). Raises :class:`JobNotFound`."""
        job = self._jobs.get(job_id)
        if job is None and self.store is not None and self._persister is not None:
            stored = await self.store.load_job(job_id)
            if stored is not None:
                return stored.record
        await trio.lowlevel.checkpoint()
        return self._job(job_id).record()

    async def load(self, job_id: str) -> bool:
        """Make a job that is not in memory known again from the store; True when the
        job is in the registry afterwards (get, open_stream, history, cancel_job then
        work on it). Finished jobs that retention dropped are restored with their
        stored events and signal; in shared mode (:func:`run_shared_jobs`) a job of
        another node is followed. False without a store being persisted."""
        if job_id in self._jobs:
            await trio.lowlevel.checkpoint()
            return True
        from ._persist import load_stored

        return await load_stored(self, job_id)

    def history(self, job_id: str) -> list[Transition]:
        """Every state the job entered, with its time and reason."""
        return list(self._job(job_id).history)

    def events(self, job_id: str) -> list[Any]:
        """The narration events still retained for the job."""
        return self._job(job_id).log.events()

    def list_jobs(
        self,
        state: JobState | str | None = None,
        tag: str | tuple[str, str] | Mapping[str, str] | None = None,
    ) -> list[JobRecord]:
        """Records of known jobs, oldest first, filtered by state and ``key:value`` tags."""
        if self._expiry:
            self._purge_if_in_trio()
        want_state = JobState(state) if isinstance(state, str) else state
        want_tags = _parse_tag(tag)
        out = []
        for job in self._jobs.values():
            if want_state is not None and job.state is not want_state:
                continue
            if want_tags:
                tags = job.tags or {}
                if any(tags.get(k) != v for k, v in want_tags.items()):
                    continue
            out.append(job.record())
        return out

    def counts(self) -> dict[JobState, int]:
        """Number of jobs in memory per state."""
        counts = dict.fromkeys(JobState, 0)
        for job in self._jobs.values():
            counts[job.state] += 1
        return counts

    # ---- cancelling -----------------------------------------------------------------

    def cancel_job(self, job_id: str, reason: str | None = None) -> bool:
        """Cancel a queued, running or retrying job.

        Returns True exactly when this call decides the job's outcome: the job will end
        CANCELLED (a queued job never runs; a running job's scope is cancelled and its
        signal comes once all its tasks have finished). Returns False for finished and
        unknown jobs, and for a job already being cancelled.
        """
        job = self._jobs.get(job_id)
        if job is None or job.state.is_terminal or job.cancel_requested:
            return False
        job.cancel_requested = True
        job.cancel_reason = reason
        if self._cancel_elsewhere is not None and self._cancel_elsewhere(job):
            return True
        if job.state is JobState.QUEUED:
            self.finish(job, TerminalSignal(Signal.CANCELLED), reason or "cancelled while queued")
        elif job.scope is not None:
            job.scope.cancel()
        return True

    # ---- streaming ------------------------------------------------------------------

    def open_stream(self, job_id: str, after: int | None = None) -> JobStream:
        """A receive channel of the job's events after ``after``, then its signal."""
        return self._job(job_id).log.open_stream(after)

    @asynccontextmanager
    async def subscribe(
        self,
        job_id: str,
        after: int | None = None,
    ) -> AsyncIterator[JobStream]:
        """Follow a job: retained events from the start (or after event id ``after``),
        live events, then exactly one terminal signal, after which the channel ends.

        Raises :class:`JobNotFound` on entry for an unknown job.
        """
        stream = self.open_stream(job_id, after)
        await trio.lowlevel.checkpoint()
        try:
            yield stream
        finally:
            stream.close()

    async def wait(self, job_id: str) -> JobRecord:
        """Block until the job has finished and return its final record."""
        job = self._job(job_id)
        while job.log.terminal is None:
            await job.log.wait_changed()
        await trio.lowlevel.checkpoint()
        return job.record()

    # ---- internals shared with the runner ---------------------------------------------

    def add_observer(self, observer: TransitionObserver) -> None:
        """Call ``observer(job, transition)`` on every state change (synchronously)."""
        self._observers.append(observer)

    def remove_observer(self, observer: TransitionObserver) -> None:
        self._observers.remove(observer)

    def _notify(self, job: Job, transition: Transition) -> None:
        for observer in self._observers:
            try:
                observer(job, transition)
            except Exception:
                # An observer (metrics, persistence) must not break a job's lifecycle.
                logger.exception("job observer %r failed on %s", observer, job.id)

    def transition(self, job: Job, state: JobState, reason: str | None = None) -> None:
        """Move a live job to a non-terminal state and record it."""
        if job.state.is_terminal:
            raise InvalidJobState(f"{job.id} is already {job.state.value}")
        if state is JobState.RUNNING and job.state is not JobState.RUNNING:
            if job.started_at is None:
                job.started_at = time.time()
            if job.state is JobState.QUEUED:
                self.running += 1
        job.state = state
        entry = Transition(state, time.time(), reason)
        job.history.append(entry)
        self._notify(job, entry)

    def finish(self, job: Job, signal: TerminalSignal, reason: str | None = None) -> None:
        """Give a job its terminal state and close its narration channel (once)."""
        if job.state.is_terminal:
            return
        if job.state is not JobState.QUEUED:
            self.running -= 1
        state = STATE_OF_SIGNAL[signal.signal]
        job.state = state
        job.error = signal.message if signal.signal is Signal.ERROR else None
        job.finished_at = time.time()
        job.next_attempt_at = None
        entry = Transition(state, job.finished_at, reason or job.error)
        job.history.append(entry)
        job.scope = None
        sender, job.sender = job.sender, None
        try:
            self._notify(job, entry)
        finally:
            if sender is not None:
                sender.set_outcome(signal)
                sender.close()
        if self.retention is not None:
            expiry = trio.current_time() + self.retention
            self._expiry.append((expiry, job.id))
            if expiry < self._sweep_deadline:
                self._expiry_lot.unpark_all()

    async def next_job(self) -> Job:
        """Wait for the highest-priority queued job, take it off the queue and return it.

        Jobs whose queue deadline (``expires``) passed are failed instead of returned.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            queue = self._queue
            while queue:
                job = heapq.heappop(queue)[2]
                if job.state is not JobState.QUEUED:
                    continue
                if job.expires_at is not None and trio.current_time() >= job.expires_at:
                    self._expire(job)
                    continue
                return job
            await self._queue_lot.park()

    def requeue(self, job: Job) -> None:
        """Put a taken job back (a runner stopped before it could start it)."""
        if job.state is JobState.QUEUED:
            heapq.heappush(self._queue, (-job.priority, job.seq, job))
            if self._queue_lot:
                self._queue_lot.unpark()

    def _expire(self, job: Job) -> None:
        self.finish(
            job, TerminalSignal(Signal.ERROR, "Job expired in the queue before it ran"), "expired"
        )

    def _purge_if_in_trio(self) -> None:
        """Drop expired jobs now, so lookups honour retention exactly (the sweeper only
        wakes every tenth of the retention)."""
        with contextlib.suppress(RuntimeError):  # outside trio.run: no clock to compare
            self._purge()

    def _purge(self) -> None:
        expiry = self._expiry
        if not expiry:
            return
        now = trio.current_time()
        jobs = self._jobs
        while expiry and expiry[0][0] <= now:
            _, job_id = expiry.popleft()
            job = jobs.get(job_id)
            if job is not None and job.state.is_terminal:
                del jobs[job_id]
        # A dict never shrinks on deletes: rebuild it once most of its peak has left.
        if len(jobs) > self._jobs_peak:
            self._jobs_peak = len(jobs)
        elif self._jobs_peak > 1024 and len(jobs) < self._jobs_peak // 4:
            self._jobs = dict(jobs)
            self._jobs_peak = len(jobs)

    def _next_deadline(self) -> float:
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].state is not JobState.QUEUED:
            heapq.heappop(deadlines)
        deadline = deadlines[0][0] if deadlines else math.inf
        if self._expiry:
            # Finished jobs expire one after another; sweeping them in slices of a tenth of
            # the retention (at most 1 s) wakes the sweeper once per slice, not once per job.
            slack = min(1.0, (self.retention or 0.0) / 10)
            deadline = min(deadline, self._expiry[0][0] + slack)
        return deadline

    async def sweep(self) -> None:
        """Forever: drop finished jobs past retention and fail queued jobs past ``expires``."""
        try:
            while True:
                self._sweep_deadline = deadline = self._next_deadline()
                with trio.move_on_at(deadline):
                    await self._expiry_lot.park()
                self._sweep_deadline = -math.inf
                now = trio.current_time()
                self._purge()
                deadlines = self._deadlines
                while deadlines and deadlines[0][0] <= now:
                    job = heapq.heappop(deadlines)[2]
                    if job.state is JobState.QUEUED:
                        self._expire(job)
        finally:
            self._sweep_deadline = math.inf
