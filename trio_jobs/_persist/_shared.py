"""Shared mode: several nodes (queens) run the jobs of one store's table.

:class:`SharedRunner` claims jobs through the :class:`~trio_jobs._stores._base.SharedStore`
operations, follows the jobs of this registry that run elsewhere, takes over the jobs of
nodes that died, and forwards cancels. Its promises:

- A claim starts the job's attempt in the store in the same statement, so a job without
  retries runs at most once even when its node dies right after claiming, and a job with
  retries runs at most ``max_attempts`` times across all nodes.
- A node takes over another's jobs only when that node's lease ran out while this node
  was itself in touch with the store for a whole lease: after an outage of the store every
  node first renews its own leases, so no live node's jobs are failed ``interrupted``.
- A node whose job was taken over (its lease lapsed) stops it and writes nothing more of
  it: the store never lets a node overwrite a row another node owns.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .._job import Job
from .._models import JobState, NarrationEvent, Transition
from .._registry import JobRegistry
from .._runner import Executor, execute
from .._signals import Signal, TerminalSignal
from .._stores._base import (
    CANCEL,
    EVENTS,
    FOLLOW,
    QUEUED,
    WRITTEN,
    SharedStore,
    StoredJob,
    parse_notice,
)
from .._stores._rows import events_from_chunks
from ._writer import Persister

__all__ = ["SharedRunner"]

logger = logging.getLogger("trio_jobs.persist")

_RELAY_BACKLOG = 64
"""Events before the newest that a relay starts with: a follower has read the store,
which lags the job by a group commit, so it gets what it lacks without reading again."""

Relay = Callable[[str, Sequence[NarrationEvent]], Awaitable[None]]


class SharedRunner:
    """Runs a registry's share of the jobs in a table shared by several nodes.

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
    - renews the leases of its jobs (every third of ``lease``), and stops those it no
      longer owns.
    """

    def __init__(
        self,
        registry: JobRegistry,
        store: SharedStore,
        persister: Persister,
        executor: Executor,
        *,
        max_concurrent: int | None,
        poll_interval: float,
        lease: float,
        claim: bool = True,
        listen: bool = True,
    ) -> None:
        self.registry = registry
        self.claim = claim
        self.listen = listen
        self.store = store
        self.persister = persister
        self.executor = executor
        self.max_concurrent = max_concurrent
        self.poll_interval = poll_interval
        self.lease = lease
        self.here: set[str] = set()
        """Jobs this node claimed and runs (or ran)."""
        self.running_here = 0
        self.taken_from_here = 0
        """Jobs this node stopped because another node took them over."""
        self._cancel_queue: list[str] = []
        """Cancels asked here of jobs that may be held elsewhere, not yet sent."""
        self._cancelling: set[str] = set()
        """Sent cancels whose jobs have not ended here yet."""
        self._cancel_wake = trio.Event()
        self._next_beat = 0.0
        self._in_touch_since: float | None = None
        """Trio time since which every round reached the store (None: the last failed)."""
        self._wake = trio.Event()
        self.listening = False
        """True while the store's notices reach this node (LISTEN is connected): rows
        written and cancels asked elsewhere are then acted on as they are committed,
        and polled for only as a safety net (every ``safety_interval``)."""
        self.safety_interval = 1.0
        self._last_safety = -math.inf
        self._notified: set[str] = set()
        self._wanted: set[str] = set()
        """Jobs of this registry another node follows that do not run here (yet)."""
        self._poll_lock = trio.Lock()
        """One read-and-copy of followed jobs at a time (so none applies an older row)."""
        self._resync = False
        self._notice_wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._relayed: set[str] = set()
        """Jobs running here whose events are relayed to their followers."""
        registry.add_observer(self._observe)

    def _observe(self, job: Job, transition: Transition) -> None:
        if transition.state is JobState.QUEUED and job.id not in self.here:
            self._wake.set()  # a new job: claim it without waiting for the next poll

    def cancel_elsewhere(self, job: Job) -> bool:
        """The registry's cancel hook: True (the cancel is forwarded, not decided here)
        for a job this node does not run and another node may hold: one whose row is
        stored. A job no other node can have seen yet is cancelled here as usual."""
        if job.id in self.here or not self.persister.stored(job.id):
            return False
        self._cancel_queue.append(job.id)
        self._cancel_wake.set()
        self._wake.set()
        return True

    async def _send_cancels(self) -> None:
        """Ask the store to cancel the jobs whose cancel was asked here (their owners
        hear it at once); on failure they stay queued for the next try."""
        if not self._cancel_queue:
            await trio.lowlevel.checkpoint()
            return
        asked, self._cancel_queue = self._cancel_queue, []
        try:
            if any(self._unwritten(job_id) for job_id in asked):
                await self.persister.flush()  # the rows must be there to carry the request
            await self.store.request_cancel(asked)
        except BaseException:
            self._cancel_queue[:0] = asked
            raise
        self._cancelling.update(asked)

    def _unwritten(self, job_id: str) -> bool:
        """True when the job's row may not be committed yet (a job of this node)."""
        job = self.registry.job(job_id)
        persister = self.persister
        return job is not None and job_id not in persister.foreign and persister.unstored(job)

    async def _cancel_sender(self) -> None:
        """Forever: send cancels as soon as they are asked (not at the next round)."""
        while True:
            await self._cancel_wake.wait()
            self._cancel_wake = trio.Event()
            try:
                await self._send_cancels()
            except Exception as exc:
                logger.debug("sending cancels failed (%s); the next round retries", exc)
            self._wake.set()  # the round takes those nobody claimed

    def _followed(self) -> dict[str, int]:
        """Jobs in this registry that may run elsewhere, with their last local event id."""
        out: dict[str, int] = {}
        for job in self.registry.queued():
            if job.id not in self.here:
                out[job.id] = job.log.next_id - 1
        for job_id in self.persister.foreign:
            mirror = self.registry.job(job_id)
            if mirror is not None and not mirror.state.is_terminal:
                out[job_id] = mirror.log.next_id - 1
        return out

    async def _load(self, stored: StoredJob) -> Job:
        """The registry's job for a row this node just took (claimed, taken over or taken
        to cancel), restored when it is not here; the row's state is the job's."""
        registry = self.registry
        rec = stored.record
        job = registry.job(rec.id)
        if job is None:
            events = await self.store_events(rec.id, limit=registry.event_log_size)
            job = registry.job(rec.id)
            if job is None:
                job = registry.restore(stored, events)
                self.persister.adopt(job, stored, events[-1].id if events else 0)
                return job
        if job.id in self.persister.foreign:
            self._copy_events(job, await self.store_events(job.id, after=job.log.next_id - 1))
            job.skip_lost(stored.reserved_id)
        if rec.state is JobState.RUNNING and job.state is JobState.QUEUED:
            job.claimed(rec.attempts, rec.started_at, stored.history)
        elif job.id in self.persister.foreign:
            job.follow(rec, stored.history)
        self.persister.adopt(job, stored, job.log.next_id - 1)
        return job

    async def store_events(
        self, job_id: str, *, after: int = 0, limit: int | None = None
    ) -> list[NarrationEvent]:
        events: list[NarrationEvent] = await self.persister.store.load_events(
            job_id, after=after, limit=limit
        )
        return events

    @staticmethod
    def _copy_events(job: Job, events: list[NarrationEvent]) -> None:
        log = job.log
        for event in events:
            if event.id >= log.next_id and log.terminal is None:
                if event.id > log.next_id:
                    log.skip_to(event.id)
                log.append(event.action, event.human, event.fields, event.ts, event.actor)

    async def follow(self, job_id: str) -> bool:
        """Make a job created on another node known here (``get``, ``subscribe`` and
        ``cancel_job`` then work on it); False if the store has no such job."""
        registry = self.registry
        if job_id in registry:
            await trio.lowlevel.checkpoint()
            return True
        # One database call: a DELETE through this node waits for it to send the cancel.
        found = await self.persister.store.load_job_and_events(
            job_id, limit=registry.event_log_size
        )
        if found is None:
            return False
        stored, events = found
        if job_id in registry:  # loaded meanwhile
            return True
        job = registry.restore(stored, events, taken=False)
        if stored.record.state.is_terminal:
            registry.keep_finished(job)
            return True
        self.persister.disown(job_id)
        self._wake.set()
        if self._nursery is not None:  # nothing here waits for it
            self._nursery.start_soon(self._tell, FOLLOW, [job_id])
        else:
            await self._tell(FOLLOW, [job_id])
        return True

    async def _tell(self, kind: str, job_ids: list[str]) -> None:
        """Notify the other nodes (best effort: polling is the safety net)."""
        notify = getattr(self.store, "notify", None)
        if notify is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await notify(kind, job_ids)
        except Exception as exc:
            logger.debug("notice %s to the other nodes failed: %s", kind, exc)

    def _notice(self, payload: str) -> None:
        """A notice from the store (see ``SharedStore.listen``), acted on at once; a
        malformed one (anyone may notify the channel) is logged and ignored."""
        try:
            self._act_on(payload)
        except Exception:
            logger.warning("ignoring a notice that could not be read: %.200r", payload)

    def _act_on(self, payload: str) -> None:
        if payload.startswith(EVENTS + " "):
            self._stored_events(payload)
            return
        kind, ids = parse_notice(payload)
        if kind == WRITTEN and ids != ["*"]:
            self._notified.update(ids)
            self._notice_wake.set()
        elif kind == QUEUED:
            if self.claim:
                self._wake.set()  # claim it now (free capacity permitting)
        elif kind == CANCEL:
            for job_id in ids:
                if job_id in self.here:
                    self.registry.cancel_job(job_id, "cancelled through another node")
        elif kind == FOLLOW:
            for job_id in ids:
                if job_id in self.here:
                    self._relay(job_id)
                elif job_id in self.registry:
                    self._wanted.add(job_id)  # watched once it runs here
        else:  # a (re)connection or an overflow: notices may have been missed
            self._resync = True
            self._notice_wake.set()
            self._wake.set()

    def _stored_events(self, payload: str) -> None:
        """Events another node just stored for a job followed here: copied into its
        mirror when they continue it exactly, else read from the store."""
        _, job_id, chunk = payload.split(" ", 2)
        if job_id not in self.persister.foreign:
            return
        job = self.registry.job(job_id)
        if job is None or job.log.terminal is not None:
            return
        after = job.log.next_id - 1
        try:
            events = events_from_chunks(job_id, [chunk], after, None)
        except ValueError:
            events = []
        else:
            if not events:  # known here already
                return
        if not events or events[0].id != after + 1:
            self._notified.add(job_id)  # a gap (or nothing new): the store has it all
            self._notice_wake.set()
            return
        self._copy_events(job, events)

    def _on_listening(self, up: bool) -> None:
        self.listening = up

    async def _follow_notified(self) -> None:
        """Forever: read the rows of followed jobs that notices say were written."""
        while True:
            await self._notice_wake.wait()
            self._notice_wake = trio.Event()
            ids, self._notified = self._notified, set()
            resync, self._resync = self._resync, False
            followed = self._followed()
            want = followed if resync else {i: followed[i] for i in ids if i in followed}
            if not want:
                continue
            try:
                await self._apply(want)
            except Exception as exc:  # read them again shortly (the store reconnects)
                logger.debug("reading notified jobs failed (%s); retrying", exc)
                self._notified.update(want)
                self._notice_wake.set()
                await trio.sleep(min(self.poll_interval, 0.05))

    async def _apply(self, followed: dict[str, int]) -> None:
        """Read what other nodes wrote of jobs followed here (each with the last event id
        known here) and copy it into their mirrors."""
        async with self._poll_lock:
            for stored, events in await self.store.poll(followed):
                job = self.registry.job(stored.record.id)
                if job is None:
                    continue
                self._wanted.discard(job.id)
                if job.id not in self.persister.foreign:
                    self.persister.disown(job.id)
                await trio.lowlevel.checkpoint()
                self._copy_events(job, events)
                job.follow(stored.record, stored.history)

    async def _start(self, nursery: trio.Nursery, stored: StoredJob) -> None:
        job_id = stored.record.id
        if job_id in self.here:
            return
        # created on another node (or followed here from it), or followed by another:
        # that node streams it
        fresh = job_id not in self.registry or job_id in self.persister.foreign
        fresh = fresh or job_id in self._wanted
        self._wanted.discard(job_id)
        job = await self._load(stored)
        if job.state is not JobState.RUNNING:
            return
        self.here.add(job_id)
        if fresh:  # relay its events at once
            self._relay(job_id)
        if job.cancel_requested:  # cancelled here before the claim: it ends at once
            self._cancelling.discard(job_id)
            job.finish(TerminalSignal(Signal.CANCELLED), job.cancel_reason or "cancelled")
            return
        self.running_here += 1
        nursery.start_soon(self._run_one, job)

    def _relay(self, job_id: str) -> None:
        """Another node follows a job running here: send it the job's events as soon as
        readers here may see them (see ``PostgresStore.notify_events``); without such a
        store, the events are written at once instead."""
        notify: Relay | None = getattr(self.store, "notify_events", None)
        if notify is None or self._nursery is None:
            self.persister.watch(job_id)
            return
        job = self.registry.job(job_id)
        if job_id in self._relayed or job is None or job.log.terminal is not None:
            return
        self._relayed.add(job_id)
        self._nursery.start_soon(self._relay_events, job, notify)

    async def _relay_events(self, job: Job, notify: Relay) -> None:
        """Until the job ends (or leaves this node): each batch of events readers here
        may see (reserved in the store, so their ids are never reused), notified in one
        round trip; events arriving meanwhile make the next batch."""
        log = job.log
        stream = log.open_stream(max(log.first_id, log.next_id - _RELAY_BACKLOG) - 1)
        try:
            while job.id in self.here:
                await stream.wait_ready()
                items = stream.receive_batch()
                events = [item for item in items if isinstance(item, NarrationEvent)]
                if events and job.id in self.here:
                    try:
                        await notify(job.id, events)
                    except Exception as exc:  # the followers' safety net reads the store
                        logger.debug("relaying events of %s failed: %s", job.id, exc)
                if len(events) < len(items) or not items:
                    return  # the signal: the end is stored and notified by the writer
        finally:
            stream.close()
            self._relayed.discard(job.id)

    async def _run_one(self, job: Job) -> None:
        try:
            await execute(self.registry, job, self.executor)
        finally:
            self.running_here -= 1
            self.persister.watched.discard(job.id)
            self._wake.set()

    async def _take_over(self, stored: StoredJob) -> None:
        job = await self._load(stored)
        if job.state in (JobState.RUNNING, JobState.RETRYING) and job.id not in self.here:
            job.interrupt()
            self.registry.requeue(job)  # re-queued, unless it ended

    def _lost(self, owned: set[str]) -> None:
        """Stop the jobs running here that the store says another node owns now."""
        registry = self.registry
        for job_id in list(self.here):
            job = registry.job(job_id)
            if job is None or job.state.is_terminal:
                self.here.discard(job_id)
                continue
            if job_id in owned:
                continue
            logger.warning("job %s was taken over by another node; stopping it here", job_id)
            self.here.discard(job_id)
            self.taken_from_here += 1
            self.persister.disown(job_id)
            job.request_cancel("taken over by another node")
            if job.scope is not None:
                job.scope.cancel()

    def _prune_queue(self) -> None:
        """Nobody pops this registry's local queue in shared mode: drop what left it."""
        self.registry.prune_queue(lambda job: job.id not in self.here)

    async def run(self, nursery: trio.Nursery) -> None:
        """Poll forever; store errors are logged and retried with backoff (up to the
        lease time), so an outage of the store pauses the node instead of ending it."""
        failing = 0
        health = self.persister.health
        listen = getattr(self.store, "listen", None) if self.listen else None
        self._nursery = nursery
        nursery.start_soon(self._cancel_sender)
        if listen is not None:
            nursery.start_soon(self._follow_notified)
            nursery.start_soon(functools.partial(listen, self._notice, on_state=self._on_listening))
        while True:
            self._wake = trio.Event()
            try:
                await self._round(nursery)
            except Exception as exc:
                failing = min(failing + 1, 16)
                self._in_touch_since = None
                health.failed(exc)
                logger.debug("shared job round on %r failed; retrying", self.store, exc_info=True)
                await trio.sleep(min(self.lease / 3, self.poll_interval * 2**failing))
                continue
            failing = 0
            health.succeeded()
            if self._in_touch_since is None:
                self._in_touch_since = trio.current_time()
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()

    async def _cancels(self) -> None:
        """Send the cancels asked here, and end those of jobs nobody claimed: this node
        takes them (so no other node can) and writes their end."""
        registry = self.registry
        await self._send_cancels()
        for job_id in list(self._cancelling):
            job = registry.job(job_id)
            if job is None or job.state.is_terminal:
                self._cancelling.discard(job_id)
        if not self._cancelling:
            return
        for stored in await self.store.take_cancelled(list(self._cancelling), self.lease):
            job = registry.job(stored.record.id)
            if job is None:
                continue
            self.persister.adopt(job, stored, job.log.next_id - 1)
            self._cancelling.discard(job.id)
            if job.state.is_terminal:
                self.persister.observe(job, job.history[-1])
            else:
                job.finish(TerminalSignal(Signal.CANCELLED), job.cancel_reason or "cancelled")

    async def _round(self, nursery: trio.Nursery) -> None:
        store = self.store
        now = trio.current_time()
        if now >= self._next_beat:
            self._lost(await store.heartbeat(self.lease))
            self._next_beat = now + self.lease / 3
        await self._cancels()
        free = 64 if self.max_concurrent is None else self.max_concurrent - self.running_here
        if free > 0 and self.claim:
            if self.persister.pending:
                await self.persister.flush()  # new jobs are claimable once written
            for stored in await store.claim(free, self.lease):
                await self._start(nursery, stored)
        in_touch = self._in_touch_since
        if self.claim and in_touch is not None and now - in_touch >= self.lease:
            for stored in await store.take_over(16, self.lease):
                await self._take_over(stored)
        if not self.listening or now - self._last_safety >= self.safety_interval:
            self._last_safety = now
            for job_id in await store.cancel_requests():
                if job_id in self.here:
                    self.registry.cancel_job(job_id, "cancelled through another node")
            followed = self._followed()
            if followed:
                await self._apply(followed)
        self._prune_queue()


def shared_store(store: Any) -> SharedStore:
    """``store`` as a :class:`SharedStore` (a store with a ``node``), or ValueError."""
    if not isinstance(store, SharedStore) or getattr(store, "node", None) is None:
        raise ValueError("run_shared_jobs needs a registry with PostgresStore(node=...)")
    return store
