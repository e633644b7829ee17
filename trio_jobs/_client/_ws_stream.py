"""One job's stream over its WebSocket, as a trio receive channel resumed after a drop.

A task owns the connection (opened through the
:class:`~trio_jobs._client._connection.StreamConnection` it was given) and passes the lines
on through a bounded memory channel; the reader's side turns them into items.
"""

from __future__ import annotations

import json
from collections import deque
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import trio

from .._exceptions import StreamEndedWithoutSignal, TransportError
from .._signals import Signal, TerminalSignal
from ._connection import StreamConnection, job_path
from ._errors import map_error, raise_mapped
from ._lines import ItemChannel, line_event_id
from ._reconnect import Resumable, ResumeCursor

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

__all__ = ["JobWebSocketStream"]

_CANCEL_MESSAGE = '{"cancel": true}'
#: WebSocket close codes after which a stream is resumed: a close before the signal
#: (1000), going away (1001), an abnormal end with no close frame (1006; None: none was
#: read), server error, restart, try again later, bad gateway (1011-1014).
_RESUMABLE_CLOSE = frozenset({None, 1000, 1001, 1006, 1011, 1012, 1013, 1014})


class JobWebSocketStream(Resumable, ItemChannel):
    """One job's stream over ``GET /v1/jobs/{id}/ws``: the same items as the SSE stream.

    Made by :meth:`JobClient.stream_ws`, whose task owns the connection: it reads lines
    into a bounded buffer (a slow reader slows the socket, not memory) and, when the
    connection drops or the server closes it before the terminal signal with a code a
    retry may cure (1001: shutting down, 1006: no close frame, 1011-1014, or 1000), it
    reconnects with ``Last-Event-ID`` like the SSE stream: the same backoff, up to
    ``max_reconnects`` attempts in a row without a new event, replayed events dropped.
    Other codes (a policy or protocol violation, say) end the stream with
    :class:`StreamEndedWithoutSignal` at once. ``last_event_id``, ``reconnects`` and
    ``close_code`` tell what happened.

    :meth:`send_cancel` asks the server to cancel the job (the stream then ends with
    ``[CANCELLED]`` unless the job finished first); it is sent again on every new
    connection until the signal arrives. Error answers of the server to our messages
    (``{"error": ..., "detail": ...}``, e.g. a cancel of a job that just finished) are not
    items: they are kept in ``server_errors``.
    """

    def __init__(
        self,
        connection: StreamConnection,
        job_id: str,
        *,
        last_event_id: str | int | None = None,
        buffer: int = 256,
    ) -> None:
        self._connection = connection
        self.job_id = job_id
        self._cursor = ResumeCursor(connection.policy, last_event_id)
        self.terminal: TerminalSignal | None = None
        self.close_code: int | None = None
        self.server_errors: list[dict[str, Any]] = []
        self._send, self._receive = trio.open_memory_channel[str](buffer)
        self._pending: deque[str] = deque()
        self._error: BaseException | None = None
        self._ws: WebSocketConnection | None = None
        self._cancel_wanted = False
        self._signalled = False  # the connection task has read the terminal signal
        self._path = job_path(job_id) + "/ws"
        self._scope = trio.CancelScope()
        self._reading = trio.CancelScope()
        self._running = False
        self._done = trio.Event()
        self._closed = False

    # the connection task

    def _headers(self) -> dict[str, str]:
        last = self._cursor.last_event_id
        return {} if last is None else {"Last-Event-ID": last}

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the connection until the signal, a hopeless error or :meth:`aclose`.

        The first handshake's error is raised (through ``nursery.start``); later ones end
        the stream and are raised by the reader, after the lines that came before.
        """
        from trio_websocket import ConnectionClosed

        cursor = self._cursor
        what = f"websocket of job {self.job_id}"
        started = False
        self._running = True
        try:
            with self._scope:
                while True:
                    try:
                        async with self._connection.open_websocket(
                            self._path, self._headers()
                        ) as ws:
                            cursor.connected()
                            if not started:
                                started = True
                                task_status.started()
                            self._ws = ws
                            self._reading = trio.CancelScope()
                            try:
                                with self._reading:
                                    if self._cancel_wanted:
                                        await ws.send_message(_CANCEL_MESSAGE)
                                    while True:
                                        await self._take(await ws.get_message())
                            finally:
                                self._ws = None
                            if self._closed:
                                return  # aclose(): leaving the block closes with 1000
                    except Exception as exc:
                        if self._closed:
                            return  # aclose(): the reader is gone
                        if self._error is not None:
                            return  # bad data: the reader raises it after the lines before
                        if isinstance(exc, ConnectionClosed):
                            reason = exc.reason
                            self.close_code = reason.code if reason is not None else None
                            if self._signalled:
                                return
                            if self.close_code not in _RESUMABLE_CLOSE:
                                self._error = StreamEndedWithoutSignal(
                                    f"{what} closed before its terminal signal ({reason}); "
                                    "not resumed: the close code says a retry would not help"
                                )
                                return
                        mapped = map_error(exc, what, job_id=self.job_id)
                        if mapped is None:
                            raise
                        if not started:
                            raise_mapped(exc, mapped)
                        if not mapped.reconnectable:
                            if mapped.error is not exc:
                                mapped.error.__cause__ = exc
                            self._error = mapped.error
                            return
                        cursor.failed(exc)
                    self._error = cursor.given_up(what)
                    if self._error is not None:
                        return
                    await cursor.wait()
        finally:
            self._send.close()
            self._done.set()

    async def _take(self, message: str | bytes) -> None:
        """Pass one received message on to the reader (unless it is a replay or an answer)."""
        line = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        if line.startswith('{"error"'):
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if isinstance(answer, dict) and "action" not in answer:
                # The server's answer to a message of ours (e.g. a cancel that came late).
                self.server_errors.append(answer)
                return
        if self._signalled:
            self._error = TransportError(f"websocket of job {self.job_id}: data after the signal")
            raise self._error
        num: int | None = None
        if line.startswith("{"):
            num = line_event_id(line)
            if self._cursor.replayed(num):
                return  # replayed by the server after a reconnect
        else:
            signal = Signal.parse(line)
            if signal is None:
                self._error = TransportError(
                    f"websocket of job {self.job_id}: not an event or a signal: {line[:200]!r}"
                )
                raise self._error
            self._signalled = signal.signal.is_terminal
        self._cursor.delivered(None if num is None else str(num), num)
        await self._send.send(line)

    # the reader's side

    async def _read(self) -> str:
        """The next line; ``EndOfChannel`` after the signal; the stream's error otherwise."""
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        try:
            line = await self._receive.receive()
        except trio.EndOfChannel:
            end = self._end()
        else:
            return self._line(line)
        raise end  # outside the except: the error keeps its own cause

    def _line(self, line: str) -> str:
        if line.startswith("["):
            signal = Signal.parse(line)
            if signal is not None and signal.signal.is_terminal:
                self.terminal = signal
        return line

    def _end(self) -> BaseException:
        """What reading past the last line raises."""
        if self._error is not None:
            return self._error
        if self.terminal is not None:
            return trio.EndOfChannel()
        return StreamEndedWithoutSignal(
            f"websocket of job {self.job_id} closed before its terminal signal "
            f"(close code {self.close_code})"
        )

    async def _next_line(self) -> tuple[str, int | None]:
        if self._pending:
            await trio.lowlevel.checkpoint()
            return self._pending.popleft(), None
        return await self._read(), None

    def _next_line_nowait(self) -> tuple[str, int | None]:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._pending:
            return self._pending.popleft(), None
        try:
            return self._line(self._receive.receive_nowait()), None
        except trio.EndOfChannel:
            end = self._end()
            if isinstance(end, trio.EndOfChannel):
                raise end from None
            raise trio.EndOfChannel from None  # the error is raised by the next receive()

    async def wait_ready(self) -> None:
        if self._pending:
            await trio.lowlevel.checkpoint()
            return
        with suppress(trio.EndOfChannel):
            self._pending.append(await self._read())

    async def send_cancel(self) -> None:
        """Ask the server to cancel the job; between connections, on the next one.

        A no-op (a checkpoint) once the stream has ended.
        """
        from trio_websocket import ConnectionClosed

        self._cancel_wanted = not self._signalled
        ws = self._ws
        if ws is None or not self._cancel_wanted:
            await trio.lowlevel.checkpoint()
            return
        with suppress(ConnectionClosed):
            await ws.send_message(_CANCEL_MESSAGE)

    async def aclose(self) -> None:
        """Close the WebSocket (normal closure, code 1000) and wait until it is closed.

        The connection task stops reading and closes the connection, whose close handshake
        still has its reader; between connections, the task is cancelled.
        """
        self._closed = True
        self._receive.close()
        if not self._running:
            await trio.lowlevel.checkpoint()
            return
        if self._ws is not None:
            self._reading.cancel()
        else:
            self._scope.cancel()
        with trio.CancelScope(shield=True):
            await self._done.wait()
