"""The two stream writers: SSE response bodies and WebSocket senders.

Both follow one loop per client: take everything the job's stream has ready
(``receive_batch``), write it at once (SSE: one chunk; WebSocket: one message per line),
and only then block in ``wait_ready``. A burst of events costs one scheduler trip and,
for SSE, one chunk, whatever its size. The waits are the only places a client's
disconnect (a ``trio.Cancelled``) can land, and every stream's bookkeeping is in a
synchronous ``finally``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio

from .._channel import JobStream, StreamItem
from .._signals import TerminalSignal
from ._service import JobService
from ._wire import KEEPALIVE, SHUTDOWN_COMMENT, WireEncoder, retry_line

__all__ = ["SSE_HEADERS", "SseBody", "ws_follow"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

_ENCODING = "utf-8"
# Lone surrogates (possible in narrated strings) become the text ``\udXXX``, which inside a
# JSON string is exactly their escape, instead of failing the whole chunk.
_ERRORS = "backslashreplace"


class SseBody:
    """The body of a job's SSE response: ``retry:``, the events, the signal, the end.

    The stream counts as open (``on_disconnect``, metrics) from construction, that is from
    the moment the route accepted the request, not from the first chunk: a client that
    leaves before the body starts has still left. :meth:`close` ends that (idempotent);
    whoever writes the body arranges for it to run when the request is over, however it
    ended.

    ``pending``: items already taken from ``stream`` (written first).

    A writer calls :meth:`take` for the next chunk (None: nothing is ready, so ``await``
    :meth:`wait` and take again) until :attr:`done`; Quart iterates the body instead,
    which does the same. Whatever is ready is one chunk, so a burst of events costs one
    write; taking needs no scheduler trip. The ``retry:`` line goes in front of the first
    chunk (never alone: a stream whose first events are not ready yet costs no extra
    write). Ends early only when the server drains
    (shutdown): whatever is ready is written, then ``: server shutting down`` and the end
    of the body. A client that disconnects cancels the writer in :meth:`wait` or in its
    write; closing the body then applies the job's ``on_disconnect`` policy.
    """

    __slots__ = (
        "_check_drain",
        "_counter",
        "_head",
        "_keepalive_due",
        "_open",
        "_pending",
        "_sse",
        "done",
        "ended",
        "service",
        "stream",
    )

    def __init__(
        self, service: JobService, stream: JobStream, pending: list[StreamItem] | None = None
    ) -> None:
        self.service = service
        self.stream = stream
        self._pending = pending or []
        self._open = True
        # No data-less block may end with a blank line (some decoders dispatch an empty
        # event for it): ``retry:`` is a line of the first event's block, keep-alives and
        # the shutdown note are lone comment lines.
        self._head = retry_line(service.retry_ms)
        self._sse = WireEncoder().sse
        self._counter = service.metrics.sse_events
        self._keepalive_due = False
        self._check_drain = False
        self.done = False
        """The last chunk was taken."""
        self.ended = False
        """The body ended as it should: with the terminal signal, or the server's drain."""
        service.stream_opened(stream.job_id)
        service.metrics.sse_open.inc()

    def close(self, *, abandoned: bool = True) -> None:
        """The stream is over; ``abandoned``: its client left before the signal."""
        if not self._open:
            return
        self._open = False
        self.service.metrics.sse_open.dec()
        self.stream.close()
        self.service.stream_closed(self.stream.job_id, abandoned=abandoned and not self.ended)

    def take(self) -> bytes | None:
        """The next chunk if one is ready (synchronous), else None; :attr:`done` is True
        once the last chunk was taken."""
        service = self.service
        if self._check_drain:
            self._check_drain = False
            if service.draining and service.drain_expired():
                return self._end_by_server()
        if self._keepalive_due:
            self._keepalive_due = False
            return self._with_head(KEEPALIVE)
        items = self._pending
        if items:
            self._pending = []
        else:
            items = self.stream.receive_batch(service.batch_limit)
        if items:
            text = self._sse(items)
            if self._head:
                text = self._head + text
                self._head = ""
            self._counter.inc(len(items))
            if type(items[-1]) is TerminalSignal:
                self.done = self.ended = True
            else:
                self._check_drain = True
            return text.encode(_ENCODING, _ERRORS)
        if service.drain_expired():
            return self._end_by_server()
        return None

    def _with_head(self, chunk: bytes) -> bytes:
        if self._head:
            chunk = self._head.encode() + chunk
            self._head = ""
        return chunk

    def _end_by_server(self) -> bytes:
        self.done = self.ended = True
        return self._with_head(SHUTDOWN_COMMENT.encode())

    async def wait(self) -> None:
        """Wait until the stream has an item, a keep-alive is due or the drain ends.

        Cancellation (the client left) propagates."""
        service = self.service
        ready = await service.wait_ready(self.stream, trio.current_time() + service.keepalive_s)
        if not ready and not service.drain_expired():
            self._keepalive_due = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            while not self.done:
                chunk = self.take()
                if chunk is None:
                    await self.wait()
                else:
                    yield chunk
        finally:
            self.close()


_CANCEL_HINT = 'the only message a client may send is {"cancel": true}'


def _ws_text(line: str) -> str:
    if not line.isascii():
        try:
            line.encode(_ENCODING)
        except UnicodeEncodeError:
            return line.encode(_ENCODING, _ERRORS).decode(_ENCODING)
    return line


async def _ws_reader(service: JobService, websocket: Any, job_id: str) -> None:
    """Handle client messages: ``{"cancel": true}`` cancels the job; others get an error."""
    while True:
        message = await websocket.receive()
        try:
            data = json.loads(message)
        except (ValueError, RecursionError):
            data = None
        if isinstance(data, dict) and data.get("cancel") is True:
            cancelled = service.registry.cancel_job(job_id, "cancelled by a WebSocket client")
            if not cancelled:
                state = service.registry.get(job_id).state if job_id in service.registry else None
                await websocket.send(
                    json.dumps(
                        {
                            "error": "conflict",
                            "detail": f"the job is already {state.value}"
                            if state is not None and state.is_terminal
                            else "the job is already being cancelled",
                        }
                    )
                )
            continue
        await websocket.send(json.dumps({"error": "invalid message", "detail": _CANCEL_HINT}))


async def ws_follow(service: JobService, websocket: Any, stream: JobStream) -> None:
    """Send a job's lines over an accepted WebSocket, then close it.

    Closes with 1000 after the terminal signal, with 1001 when the server drains first.
    Client messages are read concurrently (see :func:`_ws_reader`).
    """
    job_id = stream.job_id
    line = WireEncoder().line
    limit = service.batch_limit
    counter = service.metrics.ws_events
    gauge = service.metrics.ws_open
    finished = False
    ended_by_server = False
    service.stream_opened(job_id)
    gauge.inc()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ws_reader, service, websocket, job_id)
            while True:
                items = stream.receive_batch(limit)
                if items:
                    for item in items:
                        await websocket.send(_ws_text(line(item)))
                    counter.inc(len(items))
                    if type(items[-1]) is TerminalSignal:
                        finished = True
                        break
                    if not (service.draining and service.drain_expired()):
                        continue
                if service.drain_expired():
                    ended_by_server = True
                    break
                await service.wait_ready(stream, trio.current_time() + 3600.0)
            nursery.cancel_scope.cancel()
        if finished:
            await websocket.close(1000)
        else:
            await websocket.close(1001, "server shutting down")
    finally:
        gauge.dec()
        stream.close()
        service.stream_closed(job_id, abandoned=not (finished or ended_by_server))
