"""The job's narration channel: a broadcast memory channel with a bounded replay log.

Narration is sent synchronously (``send_nowait``-style: narrate() never blocks a job) into
the job's log; every subscriber reads the log through its own cursor, so a subscriber that
comes late replays what is still retained and live subscribers wake once per batch, not
once per event. Closing the last send handle is the only thing that appends the terminal
signal, and it does so exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from ._models import NarrationEvent
from ._receive import BatchReceiveMixin, StreamItem
from ._signals import TerminalSignal

__all__ = ["BatchReceiveMixin", "JobLog", "LogSender", "StreamItem", "JobStream"]


class JobLog:
    """Per-job event log: a ring of the last ``capacity`` events plus the terminal signal."""

    __slots__ = (
        "_buf",
        "_cap",
        "_floor",
        "_lot",
        "_senders",
        "actor",
        "job_id",
        "next_id",
        "on_dirty",
        "terminal",
    )

    def __init__(self, job_id: str, actor: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("event log capacity must be >= 1")
        self.job_id = job_id
        self.actor = actor
        self._buf: list[NarrationEvent] = []
        self._cap = capacity
        self.next_id = 1
        self.terminal: TerminalSignal | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._senders = 0
        self._floor = 1
        """Ids below this are gone even while the ring is not full (a restored log)."""
        self.on_dirty: Callable[[JobLog], None] | None = None
        """One-shot hook: the next append (or the terminal signal) clears it and calls it
        with the log; persistence sets it to learn which logs changed since a flush."""

    @property
    def first_id(self) -> int:
        """Id of the oldest event still retained."""
        return max(self._floor, self.next_id - len(self._buf))

    @property
    def closed(self) -> bool:
        return self.terminal is not None

    def events(self) -> list[NarrationEvent]:
        """The retained events, oldest first."""
        first = self.first_id
        return [self.get(i) for i in range(first, self.next_id)]

    def get(self, event_id: int) -> NarrationEvent:
        return self._buf[(event_id - 1) % self._cap]

    def append(
        self,
        action: str,
        human: str,
        fields: Mapping[str, Any],
        ts: float,
        actor: str | None = None,
    ) -> NarrationEvent:
        """Add one event; raises ``trio.ClosedResourceError`` after the terminal signal."""
        if self.terminal is not None:
            raise trio.ClosedResourceError("the job's narration channel is closed")
        event_id = self.next_id
        event = NarrationEvent(
            event_id, self.job_id, ts, actor or self.actor, action, human, fields
        )
        buf = self._buf
        if len(buf) < self._cap:
            buf.append(event)
        else:
            buf[(event_id - 1) % self._cap] = event
        self.next_id = event_id + 1
        lot = self._lot
        if lot is not None and lot:
            lot.unpark_all()
        hook = self.on_dirty
        if hook is not None:
            self.on_dirty = None
            hook(self)
        return event

    def replay(self, event: NarrationEvent) -> None:
        """Re-insert a stored event (restart recovery): keeps its id and time."""
        buf = self._buf
        if len(buf) < self._cap:
            buf.append(event)
        else:
            buf[(event.id - 1) % self._cap] = event
        self.next_id = event.id + 1

    def finish(self, signal: TerminalSignal) -> TerminalSignal:
        """Append the terminal signal (once); later calls return the first one."""
        if self.terminal is not None:
            return self.terminal
        self.terminal = TerminalSignal(signal.signal, signal.message, self.next_id)
        lot = self._lot
        if lot is not None and lot:
            lot.unpark_all()
        hook = self.on_dirty
        if hook is not None:
            self.on_dirty = None
            hook(self)
        return self.terminal

    def wake(self) -> None:
        """Wake every task blocked on this log (a subscriber closed its stream)."""
        if self._lot is not None and self._lot:
            self._lot.unpark_all()

    async def wait_changed(self) -> None:
        """Block until an event or the terminal signal is appended."""
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()

    def sender(self) -> LogSender:
        return LogSender(self)

    def open_stream(self, after: int | None = None) -> JobStream:
        return JobStream(self, after)


class LogSender:
    """A send handle of a job's narration channel.

    The job holds one for its whole run, and clones may be handed to anything that narrates
    on its behalf. When the last open handle closes, the pending outcome (set with
    :meth:`set_outcome`) becomes the stream's terminal signal.
    """

    __slots__ = ("_closed", "_log", "_outcome")

    def __init__(self, log: JobLog, outcome: list[TerminalSignal | None] | None = None) -> None:
        self._log = log
        self._closed = False
        self._outcome: list[TerminalSignal | None] = outcome if outcome is not None else [None]
        log._senders += 1

    @property
    def log(self) -> JobLog:
        return self._log

    def set_outcome(self, signal: TerminalSignal) -> None:
        """Record the signal that closing the last handle will emit."""
        self._outcome[0] = signal

    def send_nowait(
        self,
        action: str,
        human: str,
        fields: Mapping[str, Any],
        ts: float,
        actor: str | None = None,
    ) -> NarrationEvent:
        if self._closed:
            raise trio.ClosedResourceError("this narration handle is closed")
        return self._log.append(action, human, fields, ts, actor)

    def clone(self) -> LogSender:
        if self._closed:
            raise trio.ClosedResourceError("cannot clone a closed narration handle")
        return LogSender(self._log, self._outcome)

    def close(self) -> TerminalSignal | None:
        """Close this handle; the last one to close emits the terminal signal."""
        if self._closed:
            return None
        self._closed = True
        log = self._log
        log._senders -= 1
        if log._senders == 0:
            outcome = self._outcome[0]
            if outcome is None:
                raise RuntimeError("narration channel closed before the job's outcome was set")
            return log.finish(outcome)
        return None

    def __enter__(self) -> LogSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JobStream(BatchReceiveMixin[StreamItem], trio.abc.ReceiveChannel[StreamItem]):
    """A subscriber's receive channel: retained events, live events, then one signal.

    ``receive()`` is a checkpoint; ``receive_nowait()`` and ``receive_batch()`` read what
    is ready without blocking, which is how servers write many events per chunk. After the
    terminal signal has been received, the stream raises ``trio.EndOfChannel``.
    """

    __slots__ = ("_closed", "_cursor", "_done", "_log", "skipped")

    def __init__(self, log: JobLog, after: int | None = None) -> None:
        self._log = log
        self._cursor = 1 if after is None else max(after + 1, 1)
        self._done = False
        self._closed = False
        self.skipped = 0
        if self._cursor < log._floor:  # a restored log: what is below its floor is gone
            self.skipped = log._floor - self._cursor
            self._cursor = log._floor

    @property
    def job_id(self) -> str:
        return self._log.job_id

    @property
    def last_id(self) -> int:
        """Id of the last item handed out (0 before the first)."""
        return self._cursor - 1

    def receive_nowait(self) -> StreamItem:
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        log = self._log
        cursor = self._cursor
        if cursor < log.next_id:
            first = log.next_id - len(log._buf)
            if cursor < first:
                self.skipped += first - cursor
                cursor = first
            self._cursor = cursor + 1
            return log._buf[(cursor - 1) % log._cap]
        terminal = log.terminal
        if terminal is not None:
            if self._done:
                raise trio.EndOfChannel
            self._done = True
            self._cursor = cursor + 1
            return terminal
        raise trio.WouldBlock

    async def receive(self) -> StreamItem:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            item = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        while True:
            await self._log.wait_changed()
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                continue

    def _ready(self) -> bool:
        log = self._log
        return self._closed or self._done or self._cursor < log.next_id or log.terminal is not None

    async def wait_ready(self) -> None:
        """Block until ``receive_nowait`` has something (an item or end of channel)."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        if self._ready():
            await trio.lowlevel.checkpoint()
            return
        while not self._ready():
            await self._log.wait_changed()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close this subscriber's end; a task blocked in it gets ClosedResourceError."""
        if not self._closed:
            self._closed = True
            self._log.wake()
