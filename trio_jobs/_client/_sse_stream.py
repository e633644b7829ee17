"""One job's SSE stream as a trio receive channel, resumed after a drop.

It reads whatever the network delivered as one batch (a checkpoint per chunk, not per
event), through the :class:`~trio_jobs._client._connection.StreamConnection` it was given.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator
from contextlib import suppress

import httpx
import trio

from .._exceptions import StreamEndedWithoutSignal, TransportError
from .._signals import Signal, TerminalSignal
from ._connection import StreamConnection, job_path
from ._errors import error_from_status, map_error, raise_mapped
from ._lines import ItemChannel, sse_int
from ._reconnect import Resumable, ResumeCursor
from ._sse_decoder import SSEDecoder, SSEMessage

__all__ = ["JobEventStream"]

_MAX_DRAIN_STEPS = 10_000


class JobEventStream(Resumable, ItemChannel):
    """One job's SSE stream: a receive channel of events and then the terminal signal.

    Made by :meth:`JobClient.stream`. Reads whatever the network delivered as a batch and
    hands it out item by item. When the connection drops, or the body ends, before the
    terminal signal it reconnects with ``Last-Event-ID`` set to the last event received, waiting
    ``backoff_s * 2**(n-1)`` seconds before attempt ``n`` (capped by the server's ``retry:``),
    up to ``max_reconnects`` attempts in a row without a new event; events the server sends
    again are dropped, so the channel has no duplicate. ``last_event_id`` and ``reconnects``
    tell what happened. After the signal the channel reads the body to its end (so the
    connection goes back to the pool) and then raises ``trio.EndOfChannel``. A ``204 No
    Content`` answer (the server has nothing after ``last_event_id``: a resume from the
    signal's id or later) ends the channel there, without a signal.
    """

    def __init__(
        self,
        connection: StreamConnection,
        job_id: str | None,
        *,
        last_event_id: str | int | None = None,
    ) -> None:
        self._connection = connection
        self.job_id = job_id
        self._cursor = ResumeCursor(connection.policy, last_event_id)
        self.terminal: TerminalSignal | None = None
        self.retry_ms: int | None = None
        self._buffer: deque[tuple[str, int | None]] = deque()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder = SSEDecoder()
        self._ended = False
        self._closed = False

    # connection management

    def _path(self) -> str:
        return job_path(self.job_id or "") + "/stream"

    def _what(self) -> str:
        return f"stream of job {self.job_id}"

    async def _open(self, request: httpx.Request | None = None) -> None:
        """Send ``request`` (default: GET the stream, resuming after ``last_event_id``).

        Raises the mapped error for an error status; lets httpx transport errors through so
        the caller can decide whether to retry.
        """
        if request is None:
            last = self._cursor.last_event_id
            headers = {} if last is None else {"Last-Event-ID": last}
            request = self._connection.stream_request("GET", self._path(), headers=headers)
        response = await self._connection.send(request)
        try:
            if response.is_error:
                body = await response.aread()
                raise error_from_status(
                    response.status_code,
                    body,
                    job_id=self.job_id,
                    reason=response.reason_phrase,
                )
            if response.status_code == 204 and self.job_id is not None:
                # Nothing comes after ``last_event_id``: the stream ended there, or before.
                await response.aclose()
                self._ended = True
                return
            if self.job_id is None:
                self.job_id = response.headers.get("x-job-id")
            ctype = response.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                body = await response.aread()
                if self.job_id is None and response.status_code == 201:
                    # The server ignored ``Accept``: it created the job; follow its stream.
                    try:
                        self.job_id = str(json.loads(body)["job_id"])
                    except (ValueError, KeyError, TypeError):
                        raise TransportError(
                            f"{request.url.path}: 201 answer without a job id"
                        ) from None
                    await response.aclose()
                    await self._open()
                    return
                raise TransportError(
                    f"{request.method} {request.url.path}: expected text/event-stream, "
                    f"got {ctype!r}"
                )
            if self.job_id is None:
                raise TransportError(f"{request.url.path}: stream answer without X-Job-Id")
        except BaseException:
            await _close_shielded(response)
            raise
        self._response = response
        self._chunks = response.aiter_bytes()
        # Only ids of this connection count (a fresh decoder: no id is inherited from the
        # previous one), and only those up to the id we resumed after are replays.
        self._decoder = SSEDecoder()
        self._cursor.connected()

    async def _reconnect(self) -> None:
        """Wait the backoff and reopen the stream; give up after ``max_reconnects`` tries."""
        cursor = self._cursor
        while True:
            error = cursor.given_up(self._what())
            if error is not None:
                raise error
            await cursor.wait(self.retry_ms)
            try:
                await self._open()
                return
            except Exception as exc:
                mapped = map_error(exc, f"GET {self._path()}", job_id=self.job_id)
                if mapped is None:
                    raise
                if not mapped.reconnectable:
                    raise_mapped(exc, mapped)
                cursor.failed(exc)

    async def _drop(self, *, reader_done: bool = False) -> None:
        """Forget the connection; ``reader_done``: the body reader already finished."""
        response, chunks = self._response, self._chunks
        self._response = self._chunks = None
        if response is not None:
            await _close_shielded(response, None if reader_done else chunks)

    def _accept(self, message: SSEMessage) -> None:
        num = sse_int(message.id)
        if self._cursor.replayed(num):
            return  # the server replayed what was delivered before the reconnect
        if self.terminal is not None:
            raise TransportError(f"stream of job {self.job_id}: data after the terminal signal")
        data = message.data
        if not data.startswith("{"):
            signal = Signal.parse(data)
            if signal is None:
                raise TransportError(
                    f"stream of job {self.job_id}: not an event or a signal: {data[:200]!r}"
                )
            if signal.signal.is_terminal:
                self.terminal = TerminalSignal(signal.signal, signal.message, num)
        self._buffer.append((data, num))
        self._cursor.delivered(message.id, num)

    async def _fill(self) -> None:
        """Read from the network until a line is buffered or the stream has ended."""
        while not self._buffer and not self._ended:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._chunks is None:
                await self._reconnect()  # a connection, or the end (204)
                continue
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._decoder.close()
                await self._drop(reader_done=True)
                if self.terminal is not None:
                    self._ended = True
                    return
                # A body that ends before the signal (a server shutting down, a proxy
                # timeout) is resumed like a broken connection, as SSE prescribes.
                self._cursor.failed(StreamEndedWithoutSignal("the body ended without a signal"))
                continue
            except Exception as exc:
                mapped = map_error(exc, self._what(), job_id=self.job_id)
                if mapped is None:
                    raise
                await self._drop(reader_done=True)
                if self.terminal is not None:
                    self._ended = True  # the signal is in: the lost tail does not matter
                    return
                if not mapped.reconnectable:
                    raise_mapped(exc, mapped)
                self._cursor.failed(exc)
                continue
            for message in self._decoder.feed(chunk):
                self._accept(message)
            if self._decoder.retry is not None:
                self.retry_ms = self._decoder.retry

    # channel interface

    async def _filled(self) -> deque[tuple[str, int | None]]:
        """The buffer, with at least one line in it; ``EndOfChannel`` at the end."""
        if not self._buffer:
            await self._fill()
            if not self._buffer:
                raise trio.EndOfChannel
        return self._buffer

    async def _next_line(self) -> tuple[str, int | None]:
        await trio.lowlevel.checkpoint()
        return (await self._filled()).popleft()

    def _next_line_nowait(self) -> tuple[str, int | None]:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._buffer:
            return self._buffer.popleft()
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def wait_ready(self) -> None:
        await trio.lowlevel.checkpoint()
        buffer = self._buffer
        while True:
            while buffer and buffer[0][0] == "[START]":
                buffer.popleft()  # not an item: keep "empty batch = end" true
            if buffer or self._ended:
                return
            await self._fill()

    async def _next_batch(self) -> list[tuple[str, int | None]]:
        """Everything received so far (at least one line); ``EndOfChannel`` at the end."""
        buffer = await self._filled()
        batch = list(buffer)
        buffer.clear()
        return batch

    async def aclose(self) -> None:
        """Close the connection; after the terminal signal, first read the body to its end.

        Reading the rest (bounded by the client's timeout) lets httpx reuse the connection.
        A cancel interrupts the read; the connection is still closed (shielded).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self.terminal is not None and self._chunks is not None:
                with trio.move_on_after(self._connection.timeout):
                    try:
                        async for _ in self._chunks:
                            pass
                    except Exception as exc:
                        # The signal is in: a tail that fails to read does not matter.
                        if map_error(exc, "drain") is None:
                            raise
            else:
                await trio.lowlevel.checkpoint()
        finally:
            await self._drop()


async def _close_shielded(
    response: httpx.Response, chunks: AsyncIterator[bytes] | None = None
) -> None:
    """Close a streamed response even inside a cancelled scope (bounded: 1 s).

    httpx reads bodies through nested async generators; closing only the outer one leaves
    the inner ones to the garbage collector, which trio reports with a ResourceWarning.
    So the response is closed first and the reader is then driven until the closed
    connection makes it fail, which finishes every layer.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
        with suppress(httpx.HTTPError):
            await response.aclose()
        if chunks is not None:
            for _ in range(_MAX_DRAIN_STEPS):
                try:
                    await chunks.__anext__()
                except (StopAsyncIteration, httpx.HTTPError, trio.BrokenResourceError):
                    break
                except Exception:  # whatever a closed transport raises: the reader is done
                    break
