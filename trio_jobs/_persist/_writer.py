"""Persister: writes a registry's changes to its store, in group commits.

The registry stays in memory and never waits for the database, except where waiting is
the promise:

- a durable submission (:meth:`Persister.acknowledge`) returns once the job's row is
  committed; submissions that arrive together share one commit;
- an attempt starts (:meth:`Persister.before_attempt`) once its RUNNING state is stored,
  so a crash cannot make a job run more often than its retry policy allows; a job queued
  by a durable submission may begin its first attempt while the submission waits, so one
  commit both acknowledges the job and starts it (a job not acknowledged is refused and
  its attempt withdrawn before it runs);
- readers of a job's log see event ids only once the store has *reserved* them (the
  job's row records the highest id that may have been handed out, a little ahead of
  need), and the terminal signal only once the job's end is stored. After a crash, new
  ids continue past the reservation, so no id is ever reused with other content.

A flush writes everything that changed since the last one as one batch; it runs at once
when someone waits for it (or a reader waits for an id or a signal), else ``interval``
after the first change. A batch the store refuses because of one row is written job by
job: the bad job is isolated (logged, counted, retried alone), every other job is written.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import trio

from .._channel import JobLog
from .._exceptions import StoreUnavailable
from .._job import Job
from .._json import dumps
from .._models import JobState, NarrationEvent, Transition
from .._registry import JobRegistry
from .._stores._base import JobStore, JobWrite, StoredJob, WriteBatch

__all__ = ["Persister", "StoreHealth"]

logger = logging.getLogger("trio_jobs.persist")

_OPEN = 1 << 62
_TERMINAL = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}


class _Cursor:
    """What of one job is already in the store."""

    __slots__ = ("events", "inserted", "pruned", "reserved", "state", "transitions")

    def __init__(
        self,
        transitions: int = 0,
        events: int = 0,
        inserted: bool = False,
        reserved: int = 0,
        state: JobState | None = None,
    ) -> None:
        self.transitions = transitions
        self.events = events
        self.inserted = inserted
        self.reserved = reserved
        self.state = state
        """The stored state (a withdrawn attempt can leave the history as long)."""
        self.pruned = 0
        """Stored events up to this id were let go."""


_NEW = _Cursor()
"""The cursor of a job the store has nothing of (never changed)."""


@dataclass
class StoreHealth:
    """Whether the store answered the last time it was used (for ``/health``)."""

    ok: bool = True
    error: str | None = None
    since: float = field(default_factory=time.time)
    """Epoch time of the last change between ok and not ok."""
    last_ok: float = field(default_factory=trio.current_time)
    """Trio time of the last successful use."""

    def succeeded(self) -> None:
        if not self.ok:
            logger.warning("the job store is reachable again")
            self.ok, self.error, self.since = True, None, time.time()
        self.last_ok = trio.current_time()

    def failed(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}".strip()[:500]
        if self.ok:
            logger.error("the job store is unreachable: %s", text)
            self.ok, self.since = False, time.time()
        self.error = text

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "error": self.error, "since": self.since}


class _Round:
    """One flush, as seen by those waiting for it."""

    __slots__ = ("acked", "deadline", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.acked = trio.Event()
        """Set with ``done``, or once ``deadline`` passed first (acknowledgements wait for
        this: one timer per flush instead of a cancel scope per submission)."""
        self.deadline = math.inf
        """Trio time by which its first acknowledgement wanted an answer."""

    def finished(self) -> None:
        self.done.set()
        self.acked.set()


class _Part:
    """What one flush writes of one job, and where the job's cursor stands once it is
    committed."""

    __slots__ = (
        "events",
        "final",
        "job",
        "prune",
        "reserved",
        "state",
        "top",
        "transitions",
        "write",
    )

    def __init__(
        self,
        job: Job,
        write: JobWrite | None,
        events: list[NarrationEvent],
        prune: tuple[str, int] | None,
        transitions: int,
        top: int,
        reserved: int,
        final: bool,
    ) -> None:
        self.job = job
        self.write = write
        self.events = events
        self.prune = prune
        self.transitions = transitions
        self.state = job.state
        self.top = top
        """The last event id stored once committed."""
        self.reserved = reserved
        self.final = final
        """The job had ended when the part was taken: committing it stores the end."""

    def batch(self) -> WriteBatch:
        """The part as a batch of its own."""
        return WriteBatch(
            [self.write] if self.write is not None else [],
            self.events,
            [self.prune] if self.prune is not None else [],
        )


class Persister:
    """Writes a registry's changes to a store (see the module docstring).

    Args:
        registry: the registry to observe.
        store: an open store.
        interval: seconds a change may wait for its flush when nobody waits for it.
        max_batch: flush early once this many jobs changed.
        headroom: event ids reserved ahead of need, at least (it grows with the rate);
            0 reserves none, so readers see only events already stored (slower, and the
            ring may overwrite events a reader was not yet allowed to see).
        ack_timeout: seconds a durable submission waits for its commit.
    """

    def __init__(
        self,
        registry: JobRegistry,
        store: JobStore,
        *,
        interval: float = 0.02,
        max_batch: int = 2000,
        headroom: int = 256,
        ack_timeout: float = 5.0,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be > 0")
        if headroom < 0:
            raise ValueError("headroom must be >= 0")
        self.registry = registry
        self.store = store
        self.interval = interval
        self.max_batch = max_batch
        self.headroom = headroom
        self.ack_timeout = ack_timeout
        self.health = StoreHealth()
        self._dirty: dict[str, Job] = {}
        self._urgent = False
        self._live: dict[str, Job] = {}
        """Jobs of this node that ran and whose log may still gain events."""
        self._cursors: dict[str, _Cursor] = {}
        self._writing: dict[str, Job] = {}
        self._lock = trio.Lock()
        self._round = _Round()
        """The next flush."""
        self._inflight = _Round()
        """The flush being written (done when none is)."""
        self._inflight.finished()
        self._armed: list[_Round] = []
        """Rounds acknowledgements wait for, watched by :meth:`watch_acks`."""
        self._armed_lot = trio.lowlevel.ParkingLot()
        self._wake = trio.lowlevel.ParkingLot()
        self.foreign: set[str] = set()
        """Ids of jobs another node owns: followed here, never written from here."""
        self.watched: set[str] = set()
        """Ids of jobs another node follows: their events are written at once."""
        self.poisoned: dict[str, str] = {}
        """Jobs the store refused to take (id -> error), written alone each flush."""
        self.flushes = 0
        """Batches written."""
        self.rounds = 0
        """Flushes attempted, written or not (an idle registry adds none)."""
        self.failures = 0
        """Flushes that failed because the store did."""
        self.rejected_rows = 0
        """Job writes the store refused (each isolated from the rest of its batch)."""

    # ---- called synchronously by the registry and the logs -------------------------------

    def _mark(self, job: Job, urgent: bool) -> None:
        dirty = self._dirty
        dirty[job.id] = job
        if urgent:
            self._urgent = True
        if self._wake and (urgent or len(dirty) == 1 or len(dirty) >= self.max_batch):
            self._wake.unpark_all()

    def observe(self, job: Job, transition: Transition) -> None:
        """Registry observer: mark the job changed (and watched while it can narrate)."""
        if self.foreign and job.id in self.foreign:
            return
        if job.id not in self._cursors and job.id not in self._dirty:
            job.log.gate(0, hold=True)  # a new job: nothing is reserved yet
            job.log.stored_upto(0)
            job.log.on_dirty = self._log_changed
            job.log.on_held = self._log_held
        if transition.state is JobState.RUNNING:
            self._live[job.id] = job
        state = transition.state
        self._mark(job, state is not JobState.QUEUED and state is not JobState.RETRYING)

    def _log_changed(self, log: JobLog) -> None:
        """A log's ``on_dirty`` hook: its first event since the job was last collected."""
        if self.foreign and log.job_id in self.foreign:
            return
        job = self.registry.job(log.job_id)
        if job is not None and job.log is log:
            urgent = log.next_id - 1 > log.limit or log.terminal is not None
            self._mark(job, urgent or log.job_id in self.watched)

    def watch(self, job_id: str) -> None:
        """Another node follows this job: write its events at once from now on."""
        self.watched.add(job_id)
        job = self._dirty.get(job_id)
        if job is not None:
            self._mark(job, True)

    def _log_held(self, log: JobLog) -> None:
        """A log's ``on_held`` hook: it went past its reservation (readers wait), or its
        ring is full of events not stored yet."""
        job = self.registry.job(log.job_id)
        if job is not None and job.log is log and log.job_id not in self.foreign:
            self._mark(job, True)

    def disown(self, job_id: str) -> None:
        """Stop writing a job: another node owns it now (its log is the store's)."""
        self.foreign.add(job_id)
        self._dirty.pop(job_id, None)
        self._live.pop(job_id, None)
        self._cursors.pop(job_id, None)
        job = self.registry.job(job_id)
        if job is not None:
            job.log.gate(_OPEN, hold=False)
            job.log.stored_upto(None)

    def adopt(self, job: Job, stored: StoredJob, last_event_id: int) -> None:
        """Record that a job's row, history and events up to ``last_event_id`` are in
        the store as ``stored`` says; readers may see what the store reserved."""
        self.foreign.discard(job.id)
        reserved = max(stored.reserved_id, last_event_id)
        self._cursors[job.id] = _Cursor(
            len(stored.history), last_event_id, True, reserved, stored.record.state
        )
        log = job.log
        if log.terminal is None:
            log.gate(reserved, hold=True)
            log.stored_upto(last_event_id)
            log.on_dirty = self._log_changed
            log.on_held = self._log_held
            if log.next_id - 1 > reserved:
                self._mark(job, True)
        elif stored.record.state.is_terminal:
            log.gate(_OPEN, hold=False)

    def stored(self, job_id: str) -> bool:
        """True when the job's row is in the store, or being written, or another node's:
        only a job for which this is False is known to this node alone."""
        if job_id in self.foreign or job_id in self._writing:
            return True
        cursor = self._cursors.get(job_id)
        return cursor is not None and cursor.inserted

    def unstored(self, job: Job) -> bool:
        """True while some change of the job is not committed yet."""
        return job.id in self._dirty or job.id in self._writing

    # ---- waiting for commits ------------------------------------------------------------

    async def acknowledge(self, job: Job) -> None:
        """Wait until the new job's row is committed (its group commit).

        When it is not (the store is down or refused the row, did not commit within
        ``ack_timeout``, or the wait was cancelled), the job is refused: it ends FAILED
        ``not acknowledged: ...`` and never runs. An attempt begun meanwhile waits for
        this very commit (:meth:`before_attempt`), so it is withdrawn before it runs.

        Raises:
            StoreUnavailable: the store is known to be down, refused the job, or did not
                commit within ``ack_timeout``.
        """
        try:
            if not self.health.ok:
                await trio.lowlevel.checkpoint()
                raise StoreUnavailable(f"the job store is unavailable: {self.health.error}")
            error = await self._acknowledged(job)
            if error is not None:
                raise StoreUnavailable(f"the job store did not take the job: {error}") from error
        except BaseException as exc:
            cursor = self._cursors.get(job.id)
            if cursor is None or not cursor.inserted:  # else it is stored: it stays
                job.refuse(
                    "not acknowledged: "
                    + (
                        "the submission was cancelled"
                        if isinstance(exc, trio.Cancelled)
                        else "the store was unavailable"
                    )
                )
            raise

    async def _acknowledged(self, job: Job) -> BaseException | None:
        """:meth:`_commit` for an acknowledgement: the same rounds, but it gives up once
        ``ack_timeout`` passed (``watch_acks`` sets the round's ``acked``)."""
        deadline = math.inf
        if job.id in self._writing and job.id not in self._dirty:
            rnd = self._inflight  # the flush in flight holds the job
        else:
            rnd = self._round
            self._urgent = True
            self._wake.unpark_all()
        while True:
            if rnd.deadline == math.inf:
                if deadline == math.inf:
                    deadline = trio.current_time() + self.ack_timeout
                rnd.deadline = deadline
                self._armed.append(rnd)
                self._armed_lot.unpark_all()
            await rnd.acked.wait()
            if not rnd.done.is_set():
                raise StoreUnavailable(f"the job store did not commit within {self.ack_timeout:g}s")
            if rnd.error is None:
                if job.id in self.poisoned:
                    return ValueError(self.poisoned[job.id])
                return None
            if rnd is self._round or not self.unstored(job):
                return rnd.error
            rnd = self._round  # the flush holding the job failed: the next one writes it
            self._urgent = True
            self._wake.unpark_all()

    async def watch_acks(self) -> None:
        """Forever: let acknowledgements waiting for a flush past its deadline give up."""
        while True:
            armed = self._armed = [r for r in self._armed if not r.acked.is_set()]
            if not armed:
                await self._armed_lot.park()
                continue
            first = min(armed, key=lambda r: r.deadline)
            with trio.move_on_at(first.deadline):
                await first.acked.wait()
            first.acked.set()

    async def before_attempt(self, job: Job) -> None:
        """Wait until the job's current state (its new attempt) is committed, however
        long the store takes to come back; a cancel of the job ends the wait."""
        while self.unstored(job) and job.id not in self.foreign:
            if await self._commit(job) is None:
                return
        await trio.lowlevel.checkpoint()

    async def _commit(self, job: Job) -> BaseException | None:
        """Wait for the flush that will include the job's changes; its error, if any."""
        if job.id in self._writing and job.id not in self._dirty:
            current = self._inflight
            await current.done.wait()  # the flush in flight holds the job
            if current.error is None or not self.unstored(job):
                return current.error
        waiting = self._round
        self._urgent = True
        self._wake.unpark_all()
        await waiting.done.wait()
        if waiting.error is None and job.id in self.poisoned:
            return ValueError(self.poisoned[job.id])
        return waiting.error

    # ---- batching ---------------------------------------------------------------------------

    def _part(self, job: Job, cursor: _Cursor, now_trio: float, now: float) -> _Part:
        """What the store lacks of one job (``cursor``: what it has)."""
        log = job.log
        last = log.next_id - 1
        reserved = cursor.reserved
        if (
            log.terminal is None
            and (last or job.state is JobState.RUNNING)
            and (last > reserved - self.headroom // 2)
        ):
            reserved = last + max(self.headroom, 2 * max(0, last - cursor.events))
        history = job.history
        write = None
        if (
            len(history) > cursor.transitions
            or job.state is not cursor.state
            or not cursor.inserted
            or reserved > cursor.reserved
        ):
            expires = job.expires_at
            first = not cursor.inserted
            write = JobWrite(
                job.record(),
                tuple(history),
                None if expires is None else now + (expires - now_trio),
                dumps(job.payload) if first else None,
                dumps(job.metadata) if first else None,
                first=first,
                reserved_id=reserved,
            )
        events: list[NarrationEvent] = []
        prune = None
        final = log.terminal is not None and job.state in _TERMINAL
        if last > cursor.events:
            cap = self.registry.event_log_size
            # The stored log keeps the last ``cap`` events, like the ring without a store;
            # while the job runs, older ones go once another ``cap`` came (one delete per
            # ``cap`` events, not one per flush), at its end at once.
            events = log.since(max(cursor.events, last - cap))
            if last > cap and (final or last - cap - cursor.pruned >= cap):
                prune = (job.id, last - cap)
        return _Part(job, write, events, prune, len(history), last, reserved, final)

    def _collect(self) -> list[_Part]:
        """Snapshot everything changed since the last flush (synchronously), and re-arm
        the changed jobs' logs so their next event marks them again."""
        dirty, self._dirty = self._dirty, {}
        self._urgent = False
        now_trio = trio.current_time()
        now = time.time()
        cursors = self._cursors
        foreign = self.foreign
        hook = self._log_changed
        part = self._part
        parts = []
        for job_id, job in dirty.items():
            if foreign and job_id in foreign:
                continue
            log = job.log
            if log.terminal is None:
                log.on_dirty = hook
            parts.append(part(job, cursors.get(job_id, _NEW), now_trio, now))
        return parts

    def _committed(self, part: _Part) -> None:
        job = part.job
        log = job.log
        job_id = job.id
        if self.poisoned:
            self.poisoned.pop(job_id, None)
        # What was captured decides, not the job as it is now: it may have ended while
        # this part was being written, and its end is not stored yet.
        if part.final and part.top >= log.next_id - 1:
            self._cursors.pop(job_id, None)
            self._live.pop(job_id, None)
            log.gate(_OPEN, hold=False)
            log.stored_upto(None)
            log.on_held = log.on_dirty = None  # the log is closed: nothing more to store
            return
        cursor = self._cursors.get(job_id)
        if cursor is None:
            cursor = self._cursors[job_id] = _Cursor()
        cursor.inserted = True
        cursor.transitions = part.transitions
        cursor.state = part.state
        cursor.events = part.top
        cursor.reserved = part.reserved
        if part.prune is not None:
            cursor.pruned = part.prune[1]
        if job.state is JobState.QUEUED:
            self._live.pop(job_id, None)
        log.gate(part.reserved, hold=True)
        log.stored_upto(part.top)

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
        done, self._round = self._round, _Round()
        self._inflight = done
        parts = self._collect()
        batch = WriteBatch()
        batch.followed = set(self.watched)  # read by the store in its thread
        jobs, events, prune = batch.jobs, batch.events, batch.prune
        alone = []
        refused: set[str] = set()
        poisoned = self.poisoned
        for part in parts:
            if poisoned and part.job.id in poisoned:
                alone.append(part)
                continue
            if part.write is not None:
                jobs.append(part.write)
            if part.events:
                events.extend(part.events)
            if part.prune is not None:
                prune.append(part.prune)
        self._writing = {part.job.id: part.job for part in parts}
        try:
            if batch:
                try:
                    await self.store.write(batch)
                except Exception as exc:
                    if not self.store.row_error(exc):
                        raise
                    logger.warning("a batch was refused (%s); writing it job by job", exc)
                    alone = parts
            refused = {part.job.id for part in alone if not await self._write_alone(part)}
        except BaseException as exc:
            for part in parts:
                self._dirty.setdefault(part.job.id, part.job)
            if isinstance(exc, Exception):
                self.health.failed(exc)
            done.error = exc
            raise
        finally:
            self._writing = {}
            done.finished()
        self.health.succeeded()
        committed = self._committed
        for part in parts:
            if not refused or part.job.id not in refused:
                committed(part)
        if batch or alone:
            self.flushes += 1

    async def _write_alone(self, part: _Part) -> bool:
        """Write one job's part in a transaction of its own; False when refused."""
        batch = part.batch()
        if not batch:
            return True
        try:
            await self.store.write(batch)
        except Exception as exc:
            if not self.store.row_error(exc):
                raise
            job_id = part.job.id
            if job_id not in self.poisoned:
                logger.error(
                    "the store refused job %s; its writes are retried alone: %s", job_id, exc
                )
            self.rejected_rows += 1
            self.poisoned[job_id] = f"{type(exc).__name__}: {exc}"
            self._dirty.setdefault(job_id, part.job)
            return False
        return True

    async def run(self, probe_interval: float = 1.0) -> None:
        """Flush forever: at once when someone waits, else ``interval`` after a change;
        asleep while nothing changed, but for a probe of the store every
        ``probe_interval`` (so ``/health`` sees an outage). A failing store is retried
        with exponential backoff (up to 5 s); nothing is dropped meanwhile."""
        failing = 0
        while True:
            if not self._dirty:
                with trio.move_on_after(probe_interval):
                    await self._wake.park()
                if not self._dirty:
                    if trio.current_time() - self.health.last_ok >= probe_interval:
                        await self._probe()
                    continue
            if failing:
                await trio.sleep(min(5.0, self.interval * 2**failing))
            elif not self._urgent and not self.poisoned:
                with trio.move_on_after(self.interval):
                    while not self._urgent and len(self._dirty) < self.max_batch:
                        await self._wake.park()
            try:
                await self.flush()
            except Exception:
                self.failures += 1
                failing = min(failing + 1, 16)
                logger.debug("writing jobs to %r failed; retrying", self.store, exc_info=True)
            else:
                failing = 0 if not self.poisoned else failing
                if self.poisoned:
                    await trio.sleep(self.interval)

    async def _probe(self) -> None:
        try:
            await self.store.ping()
        except Exception as exc:
            self.health.failed(exc)
        else:
            self.health.succeeded()

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
                    if not self._dirty and not self._live:
                        return
                await trio.sleep(self.interval)
