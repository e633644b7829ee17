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

_make_tuple: Any = tuple.__new__

__all__ = ["BatchReceiveMixin", "JobLog", "LogSender", "StreamItem", "JobStream"]


_GAP: Any = object()
"""A ring slot of an id that was never stored (lost in a crash): skipped by readers."""

_NO_LIMIT = 1 << 62

_GROWTH = 8
"""A persisted log's ring holds up to this many times its capacity of unstored events."""


class JobLog:
    """Per-job event log: a ring of the last ``capacity`` events plus the terminal signal.

    Events are appended at once, but readers see only those up to :attr:`limit` and the
    terminal signal once :attr:`held` is cleared. Without a store both are open; a
    persisted job's log is gated by its writer (:meth:`gate`, :meth:`release`), so that
    what a subscriber sees is never taken back by a crash: ids are handed out only once
    the store has reserved them, and the signal only once the job's end is stored.
    """

    __slots__ = (
        "_buf",
        "_cap",
        "_floor",
        "_gaps",
        "_lot",
        "_origin",
        "_senders",
        "_size",
        "_unstored",
        "actor",
        "held",
        "job_id",
        "limit",
        "next_id",
        "on_dirty",
        "on_held",
        "terminal",
    )

    def __init__(self, job_id: str, actor: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("event log capacity must be >= 1")
        self.job_id = job_id
        self.actor = actor
        self._buf: list[NarrationEvent] = []
        self._cap = capacity
        self._size = capacity
        """The ring's capacity when every event is stored (or none needs to be)."""
        self._unstored = _NO_LIMIT
        """The first id persistence has not stored (see :meth:`stored_upto`)."""
        self.next_id = 1
        self.terminal: TerminalSignal | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None
        self._senders = 0
        self._floor = 1
        """Ids below this are gone even while the ring is not full (a restored log)."""
        self._origin = 1
        """The id kept at ring index 0 (ids map to ``(id - origin) % capacity``)."""
        self._gaps = False
        """True once the ring may hold gaps (a restored log, skipped ids)."""
        self.limit = _NO_LIMIT
        """The highest event id readers may see."""
        self.held = False
        """True while the terminal signal, once set, is kept from readers."""
        self.on_held: Callable[[JobLog], None] | None = None
        """Called when an append first goes past :attr:`limit` (readers now wait for the
        gate to widen), or the ring had to grow to keep unstored events: persistence then
        writes at once instead of after its interval."""
        self.on_dirty: Callable[[JobLog], None] | None = None
        """One-shot hook: the next append (or the terminal signal) clears it and calls it
        with the log; persistence sets it to learn which logs changed since a flush."""

    @classmethod
    def restored(
        cls,
        job_id: str,
        actor: str,
        capacity: int,
        events: list[NarrationEvent],
        *,
        closed: bool = False,
        next_id: int | None = None,
    ) -> JobLog:
        """A log holding stored ``events`` (ascending ids, maybe with gaps) at their ids.

        It keeps the newest events whose ids span at most ``capacity``; ids in between
        that were never stored read as nothing. A log that will never grow (``closed``)
        gets a ring exactly as long as that span. ``next_id`` (past the last event) is
        where new events continue.
        """
        log = cls(job_id, actor, capacity)
        top = events[-1].id if events else 0
        nxt = max(top + 1, next_id or 1)
        floor = max(events[0].id if events else nxt, nxt - capacity)
        kept = [e for e in events if e.id >= floor]
        floor = kept[0].id if kept else nxt
        buf: list[NarrationEvent] = [_GAP] * (nxt - floor)
        for event in kept:
            buf[event.id - floor] = event
        log._buf = buf
        log._cap = max(1, len(buf)) if closed else capacity
        log._floor = log._origin = floor
        log._gaps = True
        log.next_id = nxt
        return log

    @property
    def first_id(self) -> int:
        """Id of the oldest event still retained."""
        return max(self._floor, self.next_id - len(self._buf))

    @property
    def closed(self) -> bool:
        return self.terminal is not None

    @property
    def settled(self) -> bool:
        """True once readers can see the terminal signal."""
        return self.terminal is not None and not self.held

    def events(self) -> list[NarrationEvent]:
        """The retained events, oldest first."""
        first = self.first_id
        out = [self.get(i) for i in range(first, self.next_id)]
        return [e for e in out if e is not _GAP]

    def since(self, after: int) -> list[NarrationEvent]:
        """The retained events with ids above ``after``, oldest first (slices of the ring:
        persistence reads every event once, so this is its per-event cost)."""
        first = max(after + 1, self._floor, self.next_id - len(self._buf))
        last = self.next_id - 1
        if first > last:
            return []
        buf, cap, origin = self._buf, self._cap, self._origin
        i, j = (first - origin) % cap, (last - origin) % cap
        out = buf[i : j + 1] if i <= j else buf[i:] + buf[: j + 1]
        if self._gaps:
            out = [e for e in out if e is not _GAP]
        return out

    def get(self, event_id: int) -> NarrationEvent:
        """The event with this id (the caller knows it is retained); may be a gap."""
        return self._buf[(event_id - self._origin) % self._cap]

    def gate(self, limit: int, *, hold: bool) -> None:
        """Let readers see events up to ``limit`` only, and the signal only when not
        ``hold``; readers are woken when the gate widens."""
        wider = limit > self.limit or (self.held and not hold)
        self.limit = limit
        self.held = hold
        if wider:
            self.wake()

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
        # tuple.__new__ directly: the named tuple's own __new__ is a Python-level call
        # more, on the path of every narrate().
        event: NarrationEvent = _make_tuple(
            NarrationEvent, (event_id, self.job_id, ts, actor or self.actor, action, human, fields)
        )
        buf = self._buf
        cap = self._cap
        if len(buf) < cap:
            buf.append(event)
        elif event_id - cap >= self._unstored and cap < self._size * _GROWTH:
            self._grow(event)
        else:
            buf[(event_id - self._origin) % cap] = event
        self.next_id = event_id + 1
        if event_id <= self.limit:
            lot = self._lot
            if lot is not None and lot:
                lot.unpark_all()
        elif event_id == self.limit + 1 and self.on_held is not None:
            self.on_held(self)
        hook = self.on_dirty
        if hook is not None:
            self.on_dirty = None
            hook(self)
        return event

    def _grow(self, event: NarrationEvent) -> None:
        """The ring is full and its oldest event is not stored yet: make room instead of
        overwriting it (persistence then writes every event, and a reader a slow write
        held back misses none), up to ``_GROWTH`` times the capacity."""
        buf, cap = self._buf, self._cap
        oldest = event.id - cap
        i = (oldest - self._origin) % cap
        self._buf = buf = buf[i:] + buf[:i]
        self._origin = oldest
        self._cap = min(cap * 2, self._size * _GROWTH)
        buf.append(event)
        if self.on_held is not None:  # write now rather than after the interval
            self.on_held(self)

    def stored_upto(self, top: int | None) -> None:
        """Persistence has stored the events up to ``top``: the ring may overwrite them
        (and shrinks back to its capacity once it grew); later ones it keeps. None: the
        log is not persisted (any more)."""
        self._unstored = _NO_LIMIT if top is None else top + 1
        if self._cap > self._size and self._unstored > self.next_id - self._size:
            keep = min(len(self._buf), self._size)
            first = self.next_id - keep
            buf, cap = self._buf, self._cap
            i = (first - self._origin) % cap
            self._buf = (buf[i:] + buf[:i])[:keep] if keep else []
            self._origin = first
            self._cap = self._size

    def skip_to(self, next_id: int) -> None:
        """Leave the ids before ``next_id`` that were never stored as gaps (a mirror of a
        log whose owner skipped ids after a crash)."""
        buf, cap = self._buf, self._cap
        self._gaps = True
        if next_id - self.next_id >= cap:  # nothing retained survives the gap
            self._buf = []
            self._origin = self._floor = self.next_id = next_id
            return
        for event_id in range(self.next_id, next_id):
            if len(buf) < cap:
                buf.append(_GAP)
            else:
                buf[(event_id - self._origin) % cap] = _GAP
        self.next_id = max(self.next_id, next_id)

    def finish(self, signal: TerminalSignal) -> TerminalSignal:
        """Append the terminal signal (once); later calls return the first one."""
        if self.terminal is not None:
            return self.terminal
        self.terminal = TerminalSignal(signal.signal, signal.message, self.next_id)
        if not self.held:
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

    async def wait_settled(self) -> None:
        """Block until readers can see the terminal signal."""
        while not self.settled:
            await self.wait_changed()

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
        top = min(log.next_id, log.limit + 1)
        while cursor < top:
            first = log.next_id - len(log._buf)
            if cursor < first:
                self.skipped += first - cursor
                cursor = first
            item = log._buf[(cursor - log._origin) % log._cap]
            cursor += 1
            if item is not _GAP:
                self._cursor = cursor
                return item
        self._cursor = cursor
        terminal = log.terminal
        if terminal is not None and not log.held and cursor >= log.next_id:
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
        if self._closed or self._done:
            return True
        log = self._log
        cursor = self._cursor
        top = min(log.next_id, log.limit + 1)
        if cursor < top:
            buf, origin, cap = log._buf, log._origin, log._cap
            first = log.next_id - len(buf)
            while cursor >= first and buf[(cursor - origin) % cap] is _GAP:
                cursor += 1
                if cursor >= top:
                    break
            else:
                return True
            self._cursor = cursor
        return log.terminal is not None and not log.held

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
