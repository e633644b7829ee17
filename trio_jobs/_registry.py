"""JobRegistry: creates, looks up, lists, cancels and retires jobs."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, overload

import trio

from ._channel import JobLog, JobStream
from ._exceptions import JobNotFound
from ._job import Job, JobTally
from ._models import JobPage, JobQuery, JobRecord, JobState, Priority, RetryPolicy, Transition
from ._signals import Signal, TerminalSignal

if TYPE_CHECKING:
    from ._stores._base import JobStore

__all__ = ["Backing", "JobRegistry", "Job", "TransitionObserver"]

logger = logging.getLogger("trio_jobs.registry")

TransitionObserver = Callable[[Job, Transition], None]

_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")


class Backing(Protocol):
    """What a registry asks of the store behind it (set by persistence, see ``_run``).

    The one slot through which the lifecycle core reaches its store, typed, so the core
    imports no store or persistence code.
    """

    async def load(self, job_id: str) -> bool:
        """Make a job known here from the store (True when it is in the registry after)."""

    async def fetch(self, job_id: str) -> JobRecord | None:
        """A stored job's record, for a job not in memory."""

    def cancel_elsewhere(self, job: Job) -> bool:
        """True when the job's cancel is forwarded to another node instead of decided here."""

    async def before_attempt(self, job: Job) -> None:
        """Wait until the job's new attempt is stored (so a crash cannot run it twice)."""

    async def acknowledge(self, job: Job) -> None:
        """Wait until a new job's row is stored. When it cannot be, the job is refused
        (:meth:`Job.refuse`: it ends FAILED and never runs) and this raises."""

    async def query(self, query: JobQuery) -> JobPage:
        """A page of the stored jobs (this node's changes written first); raises
        ``StoreUnavailable`` when the store cannot answer."""


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


class _IdleRunner:
    """A runner waiting in :meth:`JobRegistry.next_job` with a free slot and ``hand``."""

    __slots__ = ("hand", "handed", "task")

    def __init__(self, hand: Callable[[Job], None], task: trio.lowlevel.Task) -> None:
        self.hand = hand
        self.task = task
        self.handed = False


def _check_storable(payload: Any, metadata: Any) -> None:
    from ._json import dumps

    for what, value in (("payload", payload), ("metadata", metadata)):
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} must be JSON-serialisable to be stored: {exc}") from None


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
        self._idle: deque[_IdleRunner] = deque()
        self._expiry: deque[tuple[float, str]] = deque()
        self._expiry_lot = trio.lowlevel.ParkingLot()
        self._expiry_unsorted = False
        self._deadlines: list[tuple[float, int, Job]] = []
        self._sweep_deadline = math.inf
        self._seq = itertools.count()
        self._observers: list[TransitionObserver] = []
        self._tally = JobTally()
        self._sweeping = False
        self.store = store
        self.backing: Backing | None = None
        """Set while the registry is persisted to its store (by ``run_persistence``)."""

    @property
    def running(self) -> int:
        """Jobs with an attempt running or between attempts (RUNNING or RETRYING)."""
        return self._tally.running

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
        if _BAD_ID.search(job_id) or len(job_id) > 200:
            raise ValueError("job_id must be at most 200 characters, without control characters")
        self._purge()
        job = self._new_job(job_id, payload, timeout, prio, retry, tag_map, metadata)
        self._jobs[job_id] = job
        if len(self._jobs) > self._jobs_peak:
            self._jobs_peak = len(self._jobs)
        if expires is not None:
            self.queue_deadline(job, trio.current_time() + expires)
        self._notify(job, job.history[0])
        if enqueue:
            self._enqueue(job)
        return job_id

    async def submit(
        self,
        payload: Any = None,
        **options: Any,
    ) -> str:
        """Like :meth:`create_job`, but returns only once the job is stored.

        With a durable store being persisted, the job's row is committed before this
        returns (concurrent submissions share one commit), so an acknowledged job
        survives a crash; :meth:`create_job` returns before that. Without a store this
        is :meth:`create_job`.

        Raises:
            ValueError: an option is out of range.
            trio_jobs.StoreUnavailable: the store did not take the job; it will not run
                (it is recorded FAILED once the store is back).
        """
        job_id = self.create_job(payload, **options)
        job = self._jobs[job_id]
        if self.backing is None:
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                # The submitter went away before it learnt the id (an HTTP client gone
                # mid-POST): nobody can follow or cancel the job, so it does not run, as
                # when a store's acknowledgement fails.
                job.refuse("not acknowledged: the submission was cancelled")
                raise
        else:
            # A queued job may begin its first attempt meanwhile: the attempt waits for
            # the same commit (``before_attempt``), so both share it.
            await self.backing.acknowledge(job)
        return job_id

    def _new_job(
        self,
        job_id: str,
        payload: Any,
        timeout: float | None,
        priority: Priority,
        retry: RetryPolicy | None,
        tags: dict[str, str] | None,
        metadata: Any,
    ) -> Job:
        log = JobLog(job_id, self.actor, self.event_log_size)
        return Job(
            job_id,
            payload,
            timeout,
            priority,
            retry,
            tags,
            metadata,
            next(self._seq),
            log,
            tally=self._tally,
            notify=self._notify,
        )

    def restore(self, stored: Any, events: list[Any], *, taken: bool = True) -> Job:
        """A job rebuilt from its stored row (``StoredJob``) and events, added here.

        Recovery, the loading of finished jobs and shared mode add jobs only this way.
        ``taken``: this process now runs the job (recovery, take-over), so event ids its
        last owner may have handed out are skipped; False for a mirror of a job another
        node runs.
        """
        rec = stored.record
        job = Job.restore(
            rec,
            stored.history,
            events,
            actor=self.actor,
            capacity=self.event_log_size,
            seq=next(self._seq),
            tally=self._tally,
            notify=self._notify,
            reserved_id=stored.reserved_id if taken else 0,
        )
        self._jobs[rec.id] = job
        if len(self._jobs) > self._jobs_peak:
            self._jobs_peak = len(self._jobs)
        return job

    def keep_finished(self, job: Job, *, fresh: bool = False) -> None:
        """Schedule a restored finished job's retention: what is left of it since it
        finished, or a whole retention when it was asked for again (``fresh``)."""
        if self.retention is None:
            return
        left = self.retention
        if not fresh:
            now = time.time()
            left -= now - (job.finished_at or now)
        expiry = trio.current_time() + max(0.0, left)
        if self._expiry and self._expiry[-1][0] > expiry:
            self._expiry_unsorted = True
        self._expiry.append((expiry, job.id))
        if expiry < self._sweep_deadline:
            self._expiry_lot.unpark_all()

    def queue_deadline(self, job: Job, at: float) -> None:
        """Fail the queued job unrun at trio time ``at`` (its ``expires``)."""
        job.expires_at = at
        heapq.heappush(self._deadlines, (at, job.seq, job))
        if at < self._sweep_deadline:
            self._expiry_lot.unpark_all()

    def _enqueue(self, job: Job) -> None:
        idle = self._idle
        if idle:
            queue = self._queue
            while queue and queue[0][2].state is not JobState.QUEUED:
                heapq.heappop(queue)
            if not queue and (job.expires_at is None or trio.current_time() < job.expires_at):
                # Nothing queued before it: a waiting runner starts it now, without a
                # scheduler trip of its own.
                runner = idle.popleft()
                runner.handed = True
                trio.lowlevel.reschedule(runner.task)
                runner.hand(job)
                return
        heapq.heappush(self._queue, (-job.priority, job.seq, job))
        if self._queue_lot:
            self._queue_lot.unpark()
        while idle:  # they take it (or what comes before it) from the queue
            trio.lowlevel.reschedule(idle.popleft().task)

    def queued(self) -> list[Job]:
        """Jobs on this registry's queue, in no particular order."""
        return [job for _, _, job in self._queue if job.state is JobState.QUEUED]

    def prune_queue(self, keep: Callable[[Job], bool]) -> None:
        """Drop queue entries of jobs that are not queued here any more or not ``keep``."""
        kept = [e for e in self._queue if e[2].state is JobState.QUEUED and keep(e[2])]
        if len(kept) < len(self._queue):
            heapq.heapify(kept)
            self._queue = kept

    def job(self, job_id: str) -> Job | None:
        """The live job object (for the runner and persistence), or None."""
        return self._jobs.get(job_id)

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
        if job is None and self.backing is not None:
            record = await self.backing.fetch(job_id)
            if record is not None:
                return record
        await trio.lowlevel.checkpoint()
        return self._job(job_id).record()

    async def load(self, job_id: str) -> bool:
        """Make a job that is not in memory known again from the store; True when the
        job is in the registry afterwards (get, open_stream, history, cancel_job then
        work on it). Finished jobs that retention dropped are restored with their
        stored events and signal; in shared mode (:func:`run_shared_jobs`) a job of
        another node is followed. False without a store being persisted."""
        if job_id in self._jobs or self.backing is None:
            await trio.lowlevel.checkpoint()
            return job_id in self._jobs
        return await self.backing.load(job_id)

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

    async def query_jobs(self, query: JobQuery | None = None) -> JobPage:
        """A page of jobs matching ``query`` (filters, order, cursor: see
        :class:`~trio_jobs._models.JobQuery`).

        While the registry is persisted the store answers, so jobs that retention dropped
        from memory and, in shared mode, jobs of every node are listed; else the jobs in
        memory. Raises ``StoreUnavailable`` when the store cannot answer.
        """
        query = query if query is not None else JobQuery()
        if self.backing is not None:
            return await self.backing.query(query)
        if self._expiry:
            self._purge_if_in_trio()
        await trio.lowlevel.checkpoint()
        return query.page(job.record() for job in self._jobs.values())

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
        if job is None or not job.request_cancel(reason):
            return False
        if self.backing is not None and self.backing.cancel_elsewhere(job):
            return True
        if job.state is JobState.QUEUED:
            job.finish(TerminalSignal(Signal.CANCELLED), reason or "cancelled while queued")
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
        """Block until the job has finished (and its end is stored, with a store being
        persisted) and return its final record."""
        job = self._job(job_id)
        await job.log.wait_settled()
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
        if transition.state.is_terminal and self.retention is not None:
            expiry = trio.current_time() + self.retention
            self._expiry.append((expiry, job.id))
            if expiry < self._sweep_deadline:
                self._expiry_lot.unpark_all()

    @overload
    async def next_job(self, hand: None = None) -> Job: ...

    @overload
    async def next_job(self, hand: Callable[[Job], None]) -> Job | None: ...

    async def next_job(self, hand: Callable[[Job], None] | None = None) -> Job | None:
        """Wait for the highest-priority queued job, take it off the queue and return it.

        Jobs whose queue deadline (``expires``) passed are failed instead of returned.
        With ``hand``, a job queued while this waits on an empty queue is given to
        ``hand(job)`` instead, synchronously by the code that queued it (so a runner can
        start the job's task at once, not a scheduler trip later), and this returns None;
        the job is still QUEUED then. Once this is cancelled, ``hand`` is not called.
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
            if hand is None:
                await self._queue_lot.park()
                continue
            runner = _IdleRunner(hand, trio.lowlevel.current_task())
            self._idle.append(runner)

            def abort(_: Any, runner: _IdleRunner = runner) -> trio.lowlevel.Abort:
                self._idle.remove(runner)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if runner.handed:
                return None

    def prefer_queued(self, job: Job) -> Job:
        """The job to start in place of ``job``, handed to a runner by :meth:`next_job`
        and not begun yet: ``job`` itself, or a job queued since that comes before it
        (a higher priority), which is then taken off the queue while ``job`` goes back
        on it. A runner that had woken up to pick would have made the same choice."""
        queue = self._queue
        while queue:
            first = queue[0]
            best = first[2]
            if best.state is not JobState.QUEUED:
                heapq.heappop(queue)
                continue
            if (first[0], first[1]) >= (-job.priority, job.seq):
                break
            heapq.heappop(queue)
            if best.expires_at is not None and trio.current_time() >= best.expires_at:
                self._expire(best)
                continue
            self._enqueue(job)
            return best
        return job

    def requeue(self, job: Job) -> None:
        """Put a taken job back (a runner stopped before it could start it)."""
        if job.state is JobState.QUEUED:
            self._enqueue(job)

    def _expire(self, job: Job) -> None:
        job.finish(
            TerminalSignal(Signal.ERROR, "Job expired in the queue before it ran"), "expired"
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
        if self._expiry_unsorted:
            self._expiry = expiry = deque(sorted(expiry))
            self._expiry_unsorted = False
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
            if self._expiry_unsorted:
                self._expiry = deque(sorted(self._expiry))
                self._expiry_unsorted = False
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
