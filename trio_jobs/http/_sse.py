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

from .._channel import JobStream
from .._signals import TerminalSignal
from ._service import JobService
from ._wire import KEEPALIVE, SHUTDOWN_COMMENT, WireEncoder, retry_preamble

__all__ = ["SSE_HEADERS", "sse_body", "ws_follow"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

_ENCODING = "utf-8"
# Lone surrogates (possible in narrated strings) become the text ``\udXXX``, which inside a
# JSON string is exactly their escape, instead of failing the whole chunk.
_ERRORS = "backslashreplace"


async def sse_body(service: JobService, stream: JobStream) -> AsyncIterator[bytes]:
    """The body of a job's SSE response: ``retry:``, the events, the signal, the end.

    Ends early only when the server drains (shutdown): whatever is ready is written,
    then ``: server shutting down`` and the end of the body. A client that disconnects
    closes this generator at its ``yield`` or wait; the job's ``on_disconnect`` policy
    is then applied.
    """
    job_id = stream.job_id
    sse = WireEncoder().sse
    limit = service.batch_limit
    keepalive = service.keepalive_s
    counter = service.metrics.sse_events
    gauge = service.metrics.sse_open
    head = retry_preamble(service.retry_ms)
    finished = False
    ended_by_server = False
    service.stream_opened(job_id)
    gauge.inc()
    try:
        while True:
            items = stream.receive_batch(limit)
            if items:
                text = sse(items)
                if head:
                    text = head + text
                    head = ""
                counter.inc(len(items))
                if type(items[-1]) is TerminalSignal:
                    finished = True
                    yield text.encode(_ENCODING, _ERRORS)
                    return
                yield text.encode(_ENCODING, _ERRORS)
                if service.draining and service.drain_expired():
                    ended_by_server = True
                    yield SHUTDOWN_COMMENT.encode()
                    return
                continue
            if head:
                yield head.encode()
                head = ""
                continue
            if service.drain_expired():
                ended_by_server = True
                yield SHUTDOWN_COMMENT.encode()
                return
            ready = await service.wait_ready(stream, trio.current_time() + keepalive)
            if not ready and not service.drain_expired():
                yield KEEPALIVE
    finally:
        gauge.dec()
        stream.close()
        service.stream_closed(job_id, abandoned=not (finished or ended_by_server))


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
