"""Job: one job's state machine, the only writer of its state, history and attempts.

Every state change of a job goes through a method here (``begin_attempt``,
``retry_later``, ``finish``, ``refuse``, ``interrupt``, ``claimed``, ``follow``), which
checks that the change is allowed, records it in the history, keeps the registry's running count
(:class:`JobTally`) and tells the registry's observers. Recovery, persistence and shared
mode build jobs with :meth:`Job.restore` and move them with these methods; nothing else
assigns ``state``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ._channel import JobLog, LogSender
from ._exceptions import InvalidJobState
from ._models import JobRecord, JobState, NarrationEvent, Priority, RetryPolicy, Transition
from ._signals import SIGNAL_OF_STATE, Signal, TerminalSignal

__all__ = ["INTERRUPTED", "Job", "JobTally", "Notify", "lost_event_fields"]

INTERRUPTED = "interrupted"
"""The error of a job that was running when its process died."""

_ACTIVE = frozenset({JobState.RUNNING, JobState.RETRYING})

Notify = Callable[["Job", Transition], None]
"""Called synchronously with the job and the transition it just made."""


class JobTally:
    """Counts over a registry's jobs, kept by :class:`Job` alone."""

    __slots__ = ("running",)

    def __init__(self) -> None:
        self.running = 0
        """Jobs RUNNING or RETRYING (an attempt in progress or between attempts)."""


def lost_event_fields(first: int, last: int) -> dict[str, Any]:
    """The fields of the event that announces ids ``first..last`` lost in a crash."""
    return {"lost": {"first": first, "last": last}}


class Job:
    """The registry's mutable view of one job; callers get frozen ``JobRecord`` snapshots."""

    __slots__ = (
        "__weakref__",
        "_notify",
        "_tally",
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
        *,
        tally: JobTally,
        notify: Notify,
        created_at: float | None = None,
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
        self.created_at = time.time() if created_at is None else created_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.next_attempt_at: float | None = None
        self.expires_at: float | None = None
        """Trio time after which the job, if still queued, fails unrun."""
        self.seq = seq
        self.log = log
        self.sender: LogSender | None = log.sender()
        self.scope: trio.CancelScope | None = None
        self.cancel_requested = False
        self.cancel_reason: str | None = None
        self.history: list[Transition] = [Transition(JobState.QUEUED, self.created_at)]
        self._tally = tally
        self._notify = notify

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

    # ---- the state machine ----------------------------------------------------------

    def _set_state(self, state: JobState) -> None:
        tally = self._tally
        tally.running += (state in _ACTIVE) - (self.state in _ACTIVE)
        self.state = state

    def _enter(self, state: JobState, reason: str | None, at: float | None = None) -> None:
        if self.state.is_terminal:
            raise InvalidJobState(f"{self.id} is already {self.state.value}")
        self._set_state(state)
        entry = Transition(state, time.time() if at is None else at, reason)
        self.history.append(entry)
        self._notify(self, entry)

    def begin_attempt(self) -> None:
        """Start the next attempt: QUEUED or RETRYING -> RUNNING, one more attempt."""
        if self.state not in (JobState.QUEUED, JobState.RETRYING):
            raise InvalidJobState(f"{self.id} cannot start from {self.state.value}")
        self.attempts += 1
        self.next_attempt_at = None
        if self.started_at is None:
            self.started_at = time.time()
        self._enter(
            JobState.RUNNING, "started" if self.attempts == 1 else f"attempt {self.attempts}"
        )

    def retry_later(self, message: str, delay: float) -> None:
        """A failed attempt will be retried after ``delay`` seconds: RUNNING -> RETRYING."""
        if self.state is not JobState.RUNNING:
            raise InvalidJobState(f"{self.id} cannot retry from {self.state.value}")
        self.next_attempt_at = time.time() + delay
        self._enter(JobState.RETRYING, message)

    def request_cancel(self, reason: str | None) -> bool:
        """Note a cancel; False when the job is finished or already being cancelled."""
        if self.state.is_terminal or self.cancel_requested:
            return False
        self.cancel_requested = True
        self.cancel_reason = reason
        return True

    def finish(self, signal: TerminalSignal, reason: str | None = None) -> bool:
        """Give the job its terminal state and close its narration channel (once).

        Returns False (and changes nothing) when the job had already finished.
        """
        if self.state.is_terminal:
            return False
        state = self._terminal_state(signal)
        self.error = signal.message if signal.signal is Signal.ERROR else None
        self.finished_at = time.time()
        self.next_attempt_at = None
        self.scope = None
        sender, self.sender = self.sender, None
        try:
            self._enter(state, reason or self.error, self.finished_at)
        finally:
            if sender is not None:
                sender.set_outcome(signal)
                sender.close()
        return True

    def refuse(self, reason: str) -> None:
        """The job was never acknowledged (its row could not be stored): it ends
        ``FAILED(reason)`` without running. A first attempt begun meanwhile (it waits for
        that very commit before it runs) is withdrawn from the history and cancelled."""
        if self.state.is_terminal:
            return
        scope = self.scope
        if self.state is JobState.RUNNING and self.attempts == 1:
            self.history.pop()
            self.attempts = 0
            self.started_at = None
            self._set_state(JobState.QUEUED)
        self.cancel_requested = True  # a runner that took the job skips its attempts
        self.finish(TerminalSignal(Signal.ERROR, reason), reason)
        if scope is not None:
            self.scope = scope  # the runner's task may not have entered it yet
            scope.cancel()

    @staticmethod
    def _terminal_state(signal: TerminalSignal) -> JobState:
        if signal.signal is Signal.DONE:
            return JobState.COMPLETED
        if signal.signal is Signal.ERROR:
            return JobState.FAILED
        if signal.signal is Signal.CANCELLED:
            return JobState.CANCELLED
        raise ValueError(f"not a terminal signal: {signal!r}")

    def interrupt(self) -> None:
        """The process that ran this job died (the job is RUNNING or RETRYING as stored):
        re-queue it when its retry policy allows another attempt, else end it
        ``FAILED("interrupted")``."""
        if self.state not in _ACTIVE:
            raise InvalidJobState(f"{self.id} is {self.state.value}, not running")
        policy = self.retry
        if policy is None or self.attempts >= policy.max_attempts:
            self.finish(TerminalSignal(Signal.ERROR, INTERRUPTED), INTERRUPTED)
            return
        self.next_attempt_at = None
        self._enter(
            JobState.QUEUED,
            f"{INTERRUPTED}; re-queued for attempt {self.attempts + 1} of {policy.max_attempts}",
        )

    def claimed(
        self, attempts: int, started_at: float | None, history: Sequence[Transition]
    ) -> None:
        """Shared mode: a claim in the store started this queued job's next attempt (the
        store's row already says RUNNING, with this attempt count and history)."""
        if self.state is not JobState.QUEUED:
            raise InvalidJobState(f"{self.id} cannot be claimed from {self.state.value}")
        self.attempts = attempts
        self.started_at = started_at
        self.next_attempt_at = None
        self._set_state(JobState.RUNNING)
        self.history = list(history)
        self._notify(self, self.history[-1])

    def follow(self, record: JobRecord, history: Sequence[Transition]) -> None:
        """Shared mode: copy another node's stored view of this job (a mirror)."""
        if self.state.is_terminal:
            return
        self.attempts = record.attempts
        self.started_at = record.started_at
        self.next_attempt_at = record.next_attempt_at
        if record.state.is_terminal:
            message = record.error if record.state is JobState.FAILED else None
            reason = history[-1].reason if history else None
            self.finish(TerminalSignal(SIGNAL_OF_STATE[record.state], message), reason)
            self.finished_at = record.finished_at
            self.history = list(history)
        elif record.state is not self.state:
            self._set_state(record.state)
            self.history = list(history)
            self._notify(self, self.history[-1] if self.history else Transition(record.state, 0))

    def skip_lost(self, reserved_id: int) -> None:
        """This process takes the job over: event ids up to ``reserved_id`` may have been
        handed out by its last owner. Those not stored here are announced by one
        ``events_lost`` event, and new events continue after ``reserved_id``, so no id is
        ever reused with other content."""
        log = self.log
        last = log.next_id - 1
        if log.terminal is not None or reserved_id <= last:
            return
        log.skip_to(reserved_id + 1)
        log.append(
            "events_lost",
            f"Events {last + 1}-{reserved_id} may have been sent before the process that "
            "ran this job stopped, and were not stored; they are lost",
            lost_event_fields(last + 1, reserved_id),
            time.time(),
        )

    # ---- building from a store ------------------------------------------------------

    @classmethod
    def restore(
        cls,
        record: JobRecord,
        history: Sequence[Transition],
        events: list[NarrationEvent],
        *,
        actor: str,
        capacity: int,
        seq: int,
        tally: JobTally,
        notify: Notify,
        reserved_id: int = 0,
    ) -> Job:
        """A job as a store holds it, with its stored events.

        A finished job gets its stored terminal signal; an unfinished one keeps its
        stored state (the caller then runs, interrupts or follows it). Event ids up to
        ``reserved_id`` may have been handed out by the process that ran the job; those
        that were not stored are announced by one ``events_lost`` event, and new events
        continue after ``reserved_id``, so no id is ever reused with other content.
        """
        closed = record.state.is_terminal
        log = JobLog.restored(record.id, actor, capacity, events, closed=closed)
        job = cls(
            record.id,
            record.payload,
            record.timeout,
            record.priority,
            record.retry,
            dict(record.tags) or None,
            record.metadata,
            seq,
            log,
            tally=tally,
            notify=notify,
            created_at=record.created_at,
        )
        job.started_at = record.started_at
        job.finished_at = record.finished_at
        job.attempts = record.attempts
        job.error = record.error
        job.next_attempt_at = record.next_attempt_at
        job.history = list(history) or [Transition(JobState.QUEUED, record.created_at)]
        if closed:
            job.state = record.state
            sender, job.sender = job.sender, None
            assert sender is not None
            message = record.error if record.state is JobState.FAILED else None
            sender.set_outcome(TerminalSignal(SIGNAL_OF_STATE[record.state], message))
            sender.close()
            return job
        job.skip_lost(reserved_id)
        job._set_state(record.state)
        return job
