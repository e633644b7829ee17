"""Wire lines back into items and outcomes: what the SSE and WebSocket streams share.

A stream's wire lines are each event's JSON object and then one signal line (``[DONE]``,
``[ERROR] <message>``, ``[CANCELLED]``; ``[START]`` may open a stream and is not an item).
:class:`ItemChannel` turns the lines of any :class:`LineSource` into
:data:`~trio_jobs.StreamItem`\\ s; :func:`raise_for_signal` turns the terminal signal into
the outcome.
"""

from __future__ import annotations

import json
import re
from abc import abstractmethod
from datetime import datetime
from typing import Protocol

import trio

from .._exceptions import (
    JobCancelled,
    JobFailed,
    JobTimeout,
    StreamEndedWithoutSignal,
    TransportError,
)
from .._models import NarrationEvent
from .._receive import BatchReceiveMixin, StreamItem
from .._signals import TIMEOUT_MESSAGE, Signal, TerminalSignal

__all__ = [
    "ItemChannel",
    "LineSource",
    "WireLineReader",
    "line_event_id",
    "parse_event",
    "raise_for_signal",
    "sse_int",
]

_TIMEOUT_RE = re.compile(
    "^" + re.escape(TIMEOUT_MESSAGE).replace(re.escape("{seconds}"), r"[0-9.e+-]+") + "$"
)


def raise_for_signal(signal: TerminalSignal | None, job_id: str | None = None) -> None:
    """Turn a stream's terminal signal into the outcome: return on ``[DONE]``, else raise.

    Raises:
        JobFailed: ``[ERROR] <message>`` (``JobTimeout`` when it is the timeout message).
        JobCancelled: ``[CANCELLED]``.
        StreamEndedWithoutSignal: no terminal signal at all.
    """
    if signal is None:
        raise StreamEndedWithoutSignal(f"stream of job {job_id} ended without a terminal signal")
    if signal.signal is Signal.DONE:
        return
    if signal.signal is Signal.CANCELLED:
        raise JobCancelled(job_id)
    message = signal.message or ""
    if _TIMEOUT_RE.match(message):
        raise JobTimeout(message, job_id=job_id)
    raise JobFailed(message, job_id=job_id)


def _epoch(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            pass
    return 0.0


def parse_event(data: str, sse_id: int | None, job_id: str | None) -> NarrationEvent:
    """Read an event line (a JSON object) back into a :class:`NarrationEvent`."""
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise TransportError(f"stream of job {job_id}: not an event or a signal: {data[:200]!r}")
    event_id = obj.pop("id", sse_id)
    return NarrationEvent(
        id=event_id if isinstance(event_id, int) else (sse_id or 0),
        job_id=str(obj.pop("job_id", job_id or "")),
        ts=_epoch(obj.pop("ts", None)),
        actor=str(obj.pop("actor", "")),
        action=str(obj.pop("action", "")),
        human=str(obj.pop("human", "")),
        fields=obj,
    )


def sse_int(value: str | None) -> int | None:
    """An event id as a number (None unless it is all ASCII digits)."""
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def line_event_id(line: str) -> int | None:
    """The id of an event line: read off our servers' ``{"id":N,...`` prefix, else parsed."""
    if line.startswith('{"id":'):
        end = line.find(",", 6)
        num = sse_int(line[6:end] if end > 0 else None)
        if num is not None:
            return num
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class LineSource(Protocol):
    """Where a stream's wire lines come from, each with its SSE id (None over WebSocket)."""

    job_id: str | None

    async def _next_line(self) -> tuple[str, int | None]: ...

    def _next_line_nowait(self) -> tuple[str, int | None]: ...

    async def aclose(self) -> None: ...


class WireLineReader(trio.abc.ReceiveChannel[str]):
    """The same stream read as raw wire lines: each event's JSON, then the signal line.

    Shares its position with the stream it came from: a line read here is not seen there.
    """

    def __init__(self, source: LineSource) -> None:
        self._source = source

    async def receive(self) -> str:
        return (await self._source._next_line())[0]

    def receive_nowait(self) -> str:
        return self._source._next_line_nowait()[0]

    async def aclose(self) -> None:
        await self._source.aclose()


class ItemChannel(BatchReceiveMixin[StreamItem], trio.abc.ReceiveChannel[StreamItem]):
    """Common item parsing for the SSE and WebSocket streams."""

    job_id: str | None
    terminal: TerminalSignal | None

    @abstractmethod
    async def _next_line(self) -> tuple[str, int | None]:
        """The next wire line and its SSE id (checkpoints; ``EndOfChannel`` at the end)."""

    @abstractmethod
    def _next_line_nowait(self) -> tuple[str, int | None]:
        """A line already received (``trio.WouldBlock`` when there is none)."""

    def _item(self, line: str, sse_id: int | None) -> StreamItem | None:
        if line.startswith("["):
            signal = Signal.parse(line)
            if signal is not None:
                if not signal.signal.is_terminal:
                    return None  # [START] opens a stream; it is not an item
                return TerminalSignal(signal.signal, signal.message, sse_id)
        return parse_event(line, sse_id, self.job_id)

    async def receive(self) -> StreamItem:
        """The next event, or the terminal signal; ``trio.EndOfChannel`` after the signal.

        Raises:
            StreamEndedWithoutSignal: the stream ended (or could not be resumed) before its
                terminal signal.
            TransportError: the server sent something that is neither an event nor a signal.
        """
        while True:
            item = self._item(*(await self._next_line()))
            if item is not None:
                return item

    def receive_nowait(self) -> StreamItem:
        """An item already received from the network, without blocking (``trio.WouldBlock``)."""
        while True:
            item = self._item(*self._next_line_nowait())
            if item is not None:
                return item

    @abstractmethod
    async def wait_ready(self) -> None:
        """Block until :meth:`receive_nowait` has something: an item, or the end.

        Raises what :meth:`receive` raises when the stream breaks.
        """

    def lines(self) -> WireLineReader:
        """This stream as raw wire lines (``[START]`` included when the server sends it)."""
        return WireLineReader(self)

    def check(self) -> None:
        """After the stream ended: return on ``[DONE]``, raise the outcome otherwise."""
        raise_for_signal(self.terminal, self.job_id)
