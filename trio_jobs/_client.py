"""JobClient: submit jobs to a trio-jobs server over HTTP and follow their streams.

Shaped like httpx (``async with JobClient(url) as client:``, keyword-only options). Streams
are ``@asynccontextmanager``\\ s handing out trio receive channels: the job's narration events
and then exactly one :class:`TerminalSignal`. The outcome helpers (:meth:`JobClient.wait`,
:meth:`JobClient.submit_and_stream`) return on ``[DONE]``, raise :class:`JobFailed` on
``[ERROR]`` (:class:`JobTimeout` for a timeout), :class:`JobCancelled` on ``[CANCELLED]``, and
:class:`StreamEndedWithoutSignal` when a stream ends without its signal: never a silent
success. A dropped SSE connection (or a body that ends before the signal) is resumed with
``Last-Event-ID`` (bounded attempts, exponential backoff on ``trio.sleep``), with no gap and
no duplicate. Streams are read to the end of the body so that httpx keeps the connection.
Every httpx and trio-websocket error becomes a trio-jobs error in one place,
:func:`_translate`.

Streams read what the network delivered as a batch: ``receive()`` costs a checkpoint per
item, ``await wait_ready()`` + ``receive_batch()`` one per network chunk, and
:meth:`JobClient.submit_and_stream` uses the batch path internally.

Cancellation: every public coroutine is a checkpoint; a cancelled request or stream closes
its connection (shielded, bounded), and nothing is retried. Cancelling the client side
never cancels the job on the server, except through the job's ``on_disconnect="cancel"``
policy or an explicit :meth:`JobClient.cancel`.
"""

from __future__ import annotations

import json
import re
import sys
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, Self, TypedDict, Unpack
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import trio

from ._channel import BatchReceiveMixin, StreamItem
from ._exceptions import (
    HTTPStatusError,
    InvalidJobState,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    StreamEndedWithoutSignal,
    TransportError,
    TrioJobsError,
)
from ._models import JobState, NarrationEvent, Priority, RetryPolicy
from ._signals import TIMEOUT_MESSAGE, Signal, TerminalSignal
from ._sse import SSEDecoder, SSEMessage

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

__all__ = [
    "DEFAULT_LIMITS",
    "JobClient",
    "JobEventStream",
    "JobWebSocketStream",
    "SubmitOptions",
    "WireLineReader",
    "raise_for_signal",
]

_JOB_OPTIONS = frozenset(
    {"timeout_s", "priority", "retry", "tags", "metadata", "on_disconnect", "expires_s"}
)
_RETRYABLE_STATUS = frozenset({502, 503, 504})
#: Pool limits of a JobClient: no cap on open connections (one per open stream), and up
#: to 64 idle ones kept for reuse.
DEFAULT_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)
_MAX_BACKOFF_S = 30.0
_MAX_DRAIN_STEPS = 10_000
_TIMEOUT_RE = re.compile(
    "^" + re.escape(TIMEOUT_MESSAGE).replace(re.escape("{seconds}"), r"[0-9.e+-]+") + "$"
)


class SubmitOptions(TypedDict, total=False):
    """Job options sent at the top level of ``POST /v1/jobs`` beside the operation."""

    timeout_s: float
    priority: Priority | Literal["low", "normal", "high", "critical"]
    retry: RetryPolicy | Mapping[str, Any]
    tags: Mapping[str, str]
    metadata: Any
    on_disconnect: Literal["detach", "cancel"]
    expires_s: float


class _Dumpable(Protocol):
    """A pydantic model (anything with ``model_dump(mode="json")``)."""

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


Operation = Mapping[str, Any] | _Dumpable
LineCallback = Callable[[str], object]


# -- the one place where transport errors become trio-jobs errors ---------------------------


def _error_from_status(
    status: int, body: bytes, *, job_id: str | None = None, reason: str = ""
) -> TrioJobsError:
    """The exception for an error answer: the server's ``{"error", "detail"}`` JSON body."""
    error: str = reason or f"status {status}"
    detail: object = None
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        error, detail = data["error"], data.get("detail")
    elif body:
        detail = body[:200].decode("utf-8", "replace")
    if status == 404 and job_id is not None:
        return JobNotFound(job_id)
    if status == 409:
        text = f"{error}: {detail}" if detail else error
        return InvalidJobState(f"job {job_id}: {text}" if job_id else text)
    return HTTPStatusError(status, error, detail)


def _translate(exc: BaseException, what: str, *, job_id: str | None = None) -> TrioJobsError | None:
    """Map an httpx or trio-websocket exception to a trio-jobs one (None: not ours to map)."""
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.HTTPError | httpx.StreamError | httpx.InvalidURL):
        return TransportError(f"{what}: {type(exc).__name__}: {exc}")
    ws = sys.modules.get("trio_websocket")
    if ws is not None:
        if isinstance(exc, ws.ConnectionRejected):
            return _error_from_status(exc.status_code, exc.body or b"", job_id=job_id)
        if isinstance(exc, ws.HandshakeError):
            cause = exc.__cause__ or exc
            return TransportError(f"{what}: {type(exc).__name__}: {cause}")
        if isinstance(exc, ws.ConnectionClosed):
            return TransportError(f"{what}: websocket closed ({exc.reason})")
    if isinstance(exc, trio.TooSlowError):
        return TransportError(f"{what}: timed out")
    if isinstance(exc, OSError):
        return TransportError(f"{what}: {type(exc).__name__}: {exc}")
    return None


def _reconnectable(exc: BaseException) -> bool:
    """Whether an error is a broken or timed-out connection, or a refusal that says "try
    again" (502/503/504), which a reconnect may cure (a body that cannot be decoded, a
    misused stream, a 404, a WebSocket refused outright, are not)."""
    if isinstance(exc, httpx.TransportError | trio.TooSlowError | OSError):
        return True
    if isinstance(exc, HTTPStatusError):
        return exc.status_code in _RETRYABLE_STATUS
    ws = sys.modules.get("trio_websocket")
    if ws is not None and isinstance(exc, ws.ConnectionClosed | ws.HandshakeError):
        return not isinstance(exc, ws.ConnectionRejected)
    return False


def _backoff_s(client: JobClient, failures: int, retry_ms: int | None) -> float:
    """The wait before reconnect attempt ``failures`` (capped by the server's ``retry:``)."""
    cap = _MAX_BACKOFF_S if retry_ms is None else retry_ms / 1000
    return float(min(client.backoff_s * 2 ** (failures - 1), cap))


def _not_resumed(
    what: str, client: JobClient, last_event_id: str | None, cause: BaseException | None
) -> StreamEndedWithoutSignal:
    error = StreamEndedWithoutSignal(
        f"{what} ended before its terminal signal and was not resumed after "
        f"{client.max_reconnects} reconnect attempt(s) (last event id {last_event_id}): "
        f"{cause!r}"
    )
    error.__cause__ = cause
    return error


@contextmanager
def _translating(what: str, *, job_id: str | None = None) -> Iterator[None]:
    """Run a block whose httpx/trio-websocket errors are raised as trio-jobs errors."""
    try:
        yield
    except Exception as exc:
        mapped = _translate(exc, what, job_id=job_id)
        if mapped is None:
            raise
        raise mapped from exc


# -- wire lines -> items and outcomes -------------------------------------------------------


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


def _parse_event(data: str, sse_id: int | None, job_id: str | None) -> NarrationEvent:
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


def _sse_int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def _line_event_id(line: str) -> int | None:
    """The id of an event line: read off our servers' ``{"id":N,...`` prefix, else parsed."""
    if line.startswith('{"id":'):
        end = line.find(",", 6)
        num = _sse_int(line[6:end] if end > 0 else None)
        if num is not None:
            return num
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_CANCEL_MESSAGE = '{"cancel": true}'
#: WebSocket close codes after which a stream is resumed: a close before the signal
#: (1000), going away (1001), an abnormal end with no close frame (1006; None: none was
#: read), server error, restart, try again later, bad gateway (1011-1014).
_RESUMABLE_CLOSE = frozenset({None, 1000, 1001, 1006, 1011, 1012, 1013, 1014})


class _LineSource(Protocol):
    job_id: str | None

    async def _next_line(self) -> tuple[str, int | None]: ...

    def _next_line_nowait(self) -> tuple[str, int | None]: ...

    async def aclose(self) -> None: ...


class WireLineReader(trio.abc.ReceiveChannel[str]):
    """The same stream read as raw wire lines: each event's JSON, then the signal line.

    Shares its position with the stream it came from: a line read here is not seen there.
    """

    def __init__(self, source: _LineSource) -> None:
        self._source = source

    async def receive(self) -> str:
        return (await self._source._next_line())[0]

    def receive_nowait(self) -> str:
        return self._source._next_line_nowait()[0]

    async def aclose(self) -> None:
        await self._source.aclose()


class _ItemChannel(BatchReceiveMixin[StreamItem], trio.abc.ReceiveChannel[StreamItem]):
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
        return _parse_event(line, sse_id, self.job_id)

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


# -- SSE ---------------------------------------------------------------------------------


class JobEventStream(_ItemChannel):
    """One job's SSE stream: a receive channel of events and then the terminal signal.

    Made by :meth:`JobClient.stream`. Reads whatever the network delivered as a batch and
    hands it out item by item. When the connection drops, or the body ends, before the
    terminal signal it reconnects with ``Last-Event-ID`` set to the last event received, waiting
    ``backoff_s * 2**(n-1)`` seconds before attempt ``n`` (capped by the server's ``retry:``),
    up to ``max_reconnects`` attempts in a row without a new event; events the server sends
    again are dropped, so the channel has no duplicate. ``last_event_id`` and ``reconnects``
    tell what happened. After the signal the channel reads the body to its end (so the
    connection goes back to the pool) and then raises ``trio.EndOfChannel``.
    """

    def __init__(
        self,
        client: JobClient,
        job_id: str | None,
        *,
        last_event_id: str | int | None = None,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self.last_event_id: str | None = None if last_event_id is None else str(last_event_id)
        self._last_num = _sse_int(self.last_event_id)
        self._resumed_after: int | None = None
        self.terminal: TerminalSignal | None = None
        self.reconnects = 0
        self.retry_ms: int | None = None
        self._buffer: deque[tuple[str, int | None]] = deque()
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder = SSEDecoder()
        self._failures = 0
        self._cause: BaseException | None = None
        self._ended = False
        self._closed = False

    # connection management

    def _path(self) -> str:
        return f"/v1/jobs/{quote(self.job_id or '', safe='')}/stream"

    async def _open(self, request: httpx.Request | None = None) -> None:
        """Send ``request`` (default: GET the stream, resuming after ``last_event_id``).

        Raises the mapped error for an error status; lets httpx transport errors through so
        the caller can decide whether to retry.
        """
        http = self._client._http
        if request is None:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = self.last_event_id
            request = http.build_request(
                "GET", self._path(), headers=headers, timeout=self._client._stream_timeout
            )
        response = await http.send(request, stream=True)
        try:
            if response.is_error:
                body = await response.aread()
                raise _error_from_status(
                    response.status_code,
                    body,
                    job_id=self.job_id,
                    reason=response.reason_phrase,
                )
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
        self._decoder = SSEDecoder()
        # Only ids of this connection count (a fresh decoder: no id is inherited from the
        # previous one), and only those up to the id we resumed after are replays.
        self._resumed_after = self._last_num

    async def _reconnect(self) -> None:
        """Wait the backoff and reopen the stream; give up after ``max_reconnects`` tries."""
        client = self._client
        while True:
            if self._failures > client.max_reconnects:
                what = f"stream of job {self.job_id}"
                raise _not_resumed(what, client, self.last_event_id, self._cause)
            await trio.sleep(_backoff_s(client, self._failures, self.retry_ms))
            self.reconnects += 1
            try:
                await self._open()
                return
            except HTTPStatusError as exc:
                if not _reconnectable(exc):
                    raise
                self._cause = exc
            except Exception as exc:
                mapped = _translate(exc, f"GET {self._path()}", job_id=self.job_id)
                if mapped is None:
                    raise
                if not _reconnectable(exc):
                    raise mapped from exc
                self._cause = exc
            self._failures += 1

    async def _drop(self, *, reader_done: bool = False) -> None:
        """Forget the connection; ``reader_done``: the body reader already finished."""
        response, chunks = self._response, self._chunks
        self._response = self._chunks = None
        if response is not None:
            await _close_shielded(response, None if reader_done else chunks)

    def _accept(self, message: SSEMessage) -> None:
        num = _sse_int(message.id)
        if num is not None and self._resumed_after is not None and num <= self._resumed_after:
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
        if message.id is not None:
            self.last_event_id = message.id
            self._last_num = num
        self._failures = 0

    async def _fill(self) -> None:
        """Read from the network until a line is buffered or the stream has ended."""
        while not self._buffer and not self._ended:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._chunks is None:
                await self._reconnect()
                assert self._chunks is not None
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
                self._failures += 1
                self._cause = StreamEndedWithoutSignal("the body ended without a signal")
                continue
            except Exception as exc:
                mapped = _translate(exc, f"stream of job {self.job_id}", job_id=self.job_id)
                if mapped is None:
                    raise
                await self._drop(reader_done=True)
                if self.terminal is not None:
                    self._ended = True  # the signal is in: the lost tail does not matter
                    return
                if not _reconnectable(exc):
                    raise mapped from exc
                self._failures += 1
                self._cause = exc
                continue
            for message in self._decoder.feed(chunk):
                self._accept(message)
            if self._decoder.retry is not None:
                self.retry_ms = self._decoder.retry

    # channel interface

    async def _next_line(self) -> tuple[str, int | None]:
        await trio.lowlevel.checkpoint()
        if not self._buffer:
            await self._fill()
            if not self._buffer:
                raise trio.EndOfChannel
        return self._buffer.popleft()

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
        if not self._buffer:
            await self._fill()
            if not self._buffer:
                raise trio.EndOfChannel
        batch = list(self._buffer)
        self._buffer.clear()
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
                with trio.move_on_after(self._client.timeout):
                    try:
                        async for _ in self._chunks:
                            pass
                    except Exception as exc:
                        # The signal is in: a tail that fails to read does not matter.
                        if _translate(exc, "drain") is None:
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


# -- WebSocket ---------------------------------------------------------------------------


class JobWebSocketStream(_ItemChannel):
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
        client: JobClient,
        job_id: str,
        *,
        last_event_id: str | int | None = None,
        buffer: int = 256,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self.last_event_id: str | None = None if last_event_id is None else str(last_event_id)
        self._last_num = _sse_int(self.last_event_id)
        self.terminal: TerminalSignal | None = None
        self.close_code: int | None = None
        self.reconnects = 0
        self.server_errors: list[dict[str, Any]] = []
        self._send, self._receive = trio.open_memory_channel[str](buffer)
        self._pending: deque[str] = deque()
        self._error: BaseException | None = None
        self._ws: WebSocketConnection | None = None
        self._cancel_wanted = False
        self._signalled = False  # the connection task has read the terminal signal
        self._url = client._ws_url(job_id)
        self._scope = trio.CancelScope()
        self._reading = trio.CancelScope()
        self._running = False
        self._done = trio.Event()
        self._closed = False

    # the connection task

    def _headers(self) -> list[tuple[bytes, bytes]]:
        token = self._client._token
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        if self.last_event_id is not None:
            headers.append((b"last-event-id", self.last_event_id.encode()))
        return headers

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Own the connection until the signal, a hopeless error or :meth:`aclose`.

        The first handshake's error is raised (through ``nursery.start``); later ones end
        the stream and are raised by the reader, after the lines that came before.
        """
        from trio_websocket import ConnectionClosed

        client = self._client
        what = f"websocket of job {self.job_id}"
        failures = 0
        started = False
        self._running = True
        try:
            with self._scope:
                while True:
                    resumed_after = self._last_num
                    try:
                        async with _open_websocket(
                            self._url, self._headers(), client.timeout
                        ) as ws:
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
                                        message = await ws.get_message()
                                        if await self._take(message, resumed_after):
                                            failures = 0
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
                        mapped = _translate(exc, what, job_id=self.job_id)
                        if mapped is None:
                            raise
                        if not started:
                            raise mapped from exc
                        if not (_reconnectable(exc) or _reconnectable(mapped)):
                            mapped.__cause__ = exc
                            self._error = mapped
                            return
                        cause: BaseException = exc
                    failures += 1
                    if failures > client.max_reconnects:
                        self._error = _not_resumed(what, client, self.last_event_id, cause)
                        return
                    await trio.sleep(_backoff_s(client, failures, None))
                    self.reconnects += 1
        finally:
            self._send.close()
            self._done.set()

    async def _take(self, message: str | bytes, resumed_after: int | None) -> bool:
        """Pass one received message on to the reader; True for a new event."""
        line = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        if line.startswith('{"error"'):
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if isinstance(answer, dict) and "action" not in answer:
                # The server's answer to a message of ours (e.g. a cancel that came late).
                self.server_errors.append(answer)
                return False
        if self._signalled:
            self._error = TransportError(f"websocket of job {self.job_id}: data after the signal")
            raise self._error
        if line.startswith("{"):
            num = _line_event_id(line)
            if num is not None:
                if resumed_after is not None and num <= resumed_after:
                    return False  # replayed by the server after a reconnect
                self.last_event_id, self._last_num = str(num), num
        else:
            signal = Signal.parse(line)
            if signal is None:
                self._error = TransportError(
                    f"websocket of job {self.job_id}: not an event or a signal: {line[:200]!r}"
                )
                raise self._error
            self._signalled = signal.signal.is_terminal
        await self._send.send(line)
        return True

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


# -- the client --------------------------------------------------------------------------


def _job_body(op: Operation, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body: the operation's fields plus the job options on top."""
    if isinstance(op, Mapping):
        body = dict(op)
    elif callable(getattr(op, "model_dump", None)):
        body = op.model_dump(mode="json")
    else:
        raise TypeError(f"operation must be a mapping or a pydantic model, got {type(op)!r}")
    unknown = options.keys() - _JOB_OPTIONS
    if unknown:
        raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))}")
    for name, value in options.items():
        if value is None:
            continue
        if name in body:
            raise ValueError(f"job option {name!r} is also a field of the operation")
        if isinstance(value, RetryPolicy):
            value = value.to_dict()
        elif isinstance(value, Priority):
            value = value.label
        elif isinstance(value, Mapping):
            value = dict(value)
        body[name] = value
    return body


def _member(data: Any, key: str, what: str) -> Any:
    """``data[key]`` of a JSON answer, or a :class:`TransportError` naming the request."""
    if isinstance(data, dict) and key in data:
        return data[key]
    raise TransportError(f"{what}: the answer has no {key!r}: {str(data)[:200]}")


def _check_line_callback(on_line: LineCallback) -> None:
    if not callable(on_line):
        raise TypeError("on_line must be a callable taking one line (str)")


class JobClient:
    """An HTTP client of a trio-jobs server (queen, hive or any app of ``trio_jobs.http``).

    Use it as an async context manager; it owns one httpx connection pool::

        async with JobClient("http://127.0.0.1:7833", token=TOKEN) as client:
            job_id = await client.submit({"operation": "status"}, timeout_s=30)
            await client.wait(job_id)

    Args:
        base_url: The server's root URL (``http://host:port``).
        token: Sent as ``Authorization: Bearer <token>`` on every request.
        timeout: Seconds for connecting, writing and reading an answer; streams have no read
            timeout (a job may be quiet for long; the server sends keep-alive comments).
        transport: An httpx transport (``httpx.MockTransport`` in unit tests).
        max_reconnects: Reconnect attempts in a row, without a new event in between, before
            a dropped stream raises :class:`StreamEndedWithoutSignal`.
        backoff_s: The wait before the first reconnect attempt; doubled for each further one.
        limits: The connection pool's limits. The default, :data:`DEFAULT_LIMITS`, has no
            cap on connections: each open stream holds one for as long as its job runs, so
            httpx's default cap (100) would make the 101st stream wait and time out.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_reconnects: int = 5,
        backoff_s: float = 0.2,
        limits: httpx.Limits | None = None,
    ) -> None:
        if max_reconnects < 0 or backoff_s < 0 or timeout <= 0:
            raise ValueError("max_reconnects and backoff_s must be >= 0, timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_reconnects = max_reconnects
        self.backoff_s = backoff_s
        self._token = token
        self._stream_timeout = httpx.Timeout(timeout, read=None)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport,
            limits=limits or DEFAULT_LIMITS,
        )

    async def __aenter__(self) -> Self:
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (streams still open are cut)."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
            await self._http.aclose()

    # plain requests

    async def _json(
        self, method: str, path: str, *, job_id: str | None = None, **kwargs: Any
    ) -> Any:
        what = f"{method} {path}"
        with _translating(what, job_id=job_id):
            response = await self._http.request(method, path, **kwargs)
        if response.is_error:
            raise _error_from_status(
                response.status_code,
                response.content,
                job_id=job_id,
                reason=response.reason_phrase,
            )
        try:
            return response.json()
        except ValueError:
            raise TransportError(f"{what}: the answer is not JSON") from None

    @staticmethod
    def _job_path(job_id: str) -> str:
        return f"/v1/jobs/{quote(job_id, safe='')}"

    async def submit(self, op: Operation, **options: Unpack[SubmitOptions]) -> str:
        """Create a job (``POST /v1/jobs``) and return its id.

        Args:
            op: The operation: a mapping, or a pydantic model (sent as
                ``model_dump(mode="json")``).
            **options: ``timeout_s``, ``priority``, ``retry`` (a dict or a
                :class:`RetryPolicy`), ``tags``, ``metadata``, ``on_disconnect``,
                ``expires_s``; None means "not given".

        Raises:
            HTTPStatusError: the server refused the job (400, 401, 413, 422, ...).
            TransportError: the server could not be reached.

        A cancel after the request went out may leave a job on the server whose id the
        caller never learns; use ``tags`` to find such jobs if that matters.
        """
        body = _job_body(op, options)
        data = await self._json("POST", "/v1/jobs", json=body)
        return str(_member(data, "job_id", "POST /v1/jobs"))

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job's record (``GET /v1/jobs/{id}``); :class:`JobNotFound` if unknown."""
        record: dict[str, Any] = await self._json("GET", self._job_path(job_id), job_id=job_id)
        return record

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's state transitions, oldest first (``GET /v1/jobs/{id}/history``)."""
        data = await self._json("GET", self._job_path(job_id) + "/history", job_id=job_id)
        history: list[dict[str, Any]] = _member(data, "history", "GET history")
        return history

    async def list_jobs(
        self, state: JobState | str | None = None, tag: str | None = None
    ) -> list[dict[str, Any]]:
        """Records of the known jobs, filtered by ``state`` and by ``tag`` (``"k:v"``)."""
        params: dict[str, str] = {}
        if state is not None:
            params["state"] = state.value if isinstance(state, JobState) else state
        if tag is not None:
            params["tag"] = tag
        data = await self._json("GET", "/v1/jobs", params=params)
        jobs: list[dict[str, Any]] = _member(data, "jobs", "GET /v1/jobs")
        return jobs

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel the job (``DELETE``) and return its record.

        Raises:
            JobNotFound: no such job (404).
            InvalidJobState: the job had already finished (409).
        """
        record: dict[str, Any] = await self._json("DELETE", self._job_path(job_id), job_id=job_id)
        return record

    async def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (needs no token)."""
        data: dict[str, Any] = await self._json("GET", "/health")
        return data

    # streams

    @asynccontextmanager
    async def stream(
        self, job_id: str, *, last_event_id: str | int | None = None
    ) -> AsyncIterator[JobEventStream]:
        """Follow a job's SSE stream: a channel of its events, then its terminal signal.

        The first connection is made on entering (an unknown job raises
        :class:`JobNotFound` there; an unreachable server :class:`TransportError`); later
        drops are resumed (see :class:`JobEventStream`). ``last_event_id`` starts after
        that event. Leaving the block early (or being cancelled) closes the connection;
        the job itself goes on unless its ``on_disconnect`` policy is ``cancel``.
        """
        events = JobEventStream(self, job_id, last_event_id=last_event_id)
        try:
            with _translating(f"GET /v1/jobs/{job_id}/stream", job_id=job_id):
                await events._open()
            yield events
        finally:
            await events.aclose()

    async def _consume(self, events: JobEventStream, on_line: LineCallback | None) -> None:
        """Read a stream to the end of its body, passing each line to ``on_line``."""
        while True:
            try:
                batch = await events._next_batch()
            except trio.EndOfChannel:
                break
            if on_line is not None:
                for line, _ in batch:
                    on_line(line)
        events.check()

    async def wait(self, job_id: str, *, last_event_id: str | int | None = None) -> None:
        """Follow the job's stream to its end: return on ``[DONE]``, else raise the outcome.

        Raises:
            JobFailed: ``[ERROR]`` (``JobTimeout`` for a timeout).
            JobCancelled: ``[CANCELLED]``.
            StreamEndedWithoutSignal: the stream ended or could not be resumed before its
                signal.
            JobNotFound: no such job.
        """
        async with self.stream(job_id, last_event_id=last_event_id) as events:
            await self._consume(events, None)

    async def submit_and_stream(
        self, op: Operation, on_line: LineCallback, **options: Unpack[SubmitOptions]
    ) -> str:
        """Create a job and follow it to its end, passing every wire line to ``on_line``.

        One request: ``POST /v1/jobs`` with ``Accept: text/event-stream`` answers with the
        job's stream (a server that answers 201 instead is followed on ``/stream``). A drop
        is resumed like :meth:`stream`. ``on_line`` gets each event's JSON line and the
        signal line; an exception it raises propagates (the connection is closed; the job
        goes on unless its ``on_disconnect`` policy is ``cancel``).

        Returns:
            The job id, once the stream ended with ``[DONE]``.

        Raises:
            JobFailed, JobTimeout, JobCancelled, StreamEndedWithoutSignal: the outcome, as
                for :meth:`wait`; the exception's ``job_id`` names the job.
            HTTPStatusError: the server refused the job.
        """
        _check_line_callback(on_line)
        body = _job_body(op, options)
        events = JobEventStream(self, None)
        try:
            with _translating("POST /v1/jobs"):
                request = self._http.build_request(
                    "POST",
                    "/v1/jobs",
                    json=body,
                    headers={"Accept": "text/event-stream", "Cache-Control": "no-cache"},
                    timeout=self._stream_timeout,
                )
                await events._open(request)
            await self._consume(events, on_line)
        finally:
            await events.aclose()
        assert events.job_id is not None
        return events.job_id

    def _ws_url(self, job_id: str) -> str:
        parts = urlsplit(self.base_url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        path = parts.path.rstrip("/") + self._job_path(job_id) + "/ws"
        return urlunsplit((scheme, parts.netloc, path, "", ""))

    @asynccontextmanager
    async def stream_ws(
        self, job_id: str, *, last_event_id: str | int | None = None
    ) -> AsyncIterator[JobWebSocketStream]:
        """Follow a job over its WebSocket: the same items as :meth:`stream`.

        A task of this block owns the connection and resumes it after a drop (see
        :class:`JobWebSocketStream`); ``last_event_id`` starts after that event (sent as
        ``Last-Event-ID``). The handle's :meth:`JobWebSocketStream.send_cancel` cancels the
        job. Leaving the block closes the WebSocket with code 1000 (cancelled from outside,
        it just closes the socket: no close handshake can complete then); an error raised
        in the block comes out alone, not in an exception group.

        Raises:
            JobNotFound: no such job (the server refused the handshake with 404).
            HTTPStatusError: another refusal (401 without a valid token, ...).
            TransportError: the server could not be reached.
        """
        channel = JobWebSocketStream(self, job_id, last_event_id=last_event_id)
        with _alone():
            async with trio.open_nursery() as nursery:
                await nursery.start(channel._run)
                try:
                    yield channel
                finally:
                    await channel.aclose()


@contextmanager
def _alone() -> Iterator[None]:
    """Let a nursery's single non-cancel exception out alone, not in an exception group."""
    try:
        yield
    except BaseExceptionGroup as group:
        _, rest = group.split(trio.Cancelled)
        leaves = _leaves(rest) if rest is not None else []
        if len(leaves) == 1:
            _raise_alone(leaves[0])
        raise


def _raise_alone(exc: BaseException) -> NoReturn:
    """Raise ``exc`` out of an ``except*``-less group handler without chaining the group."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


@asynccontextmanager
async def _open_websocket(
    url: str, headers: list[tuple[bytes, bytes]], timeout: float
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket over a TCP stream we own, so that it is closed in every case.

    (``trio_websocket.open_websocket_url`` leaves the socket to the garbage collector when
    the server refuses the handshake, which trio reports as a ResourceWarning.) Like
    ``open_websocket``, a single non-cancel exception (a refusal from the reader task, or
    one raised in the block) comes out alone, not inside an exception group.
    """
    from trio_websocket import wrap_client_stream

    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if port in (80, 443) else f"{host}:{port}"
    stream: trio.abc.Stream
    with trio.fail_after(timeout):
        if secure:
            import ssl

            stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context(), https_compatible=True
            )
        else:
            stream = await trio.open_tcp_stream(host, port)
    try:
        with _alone():
            async with trio.open_nursery() as nursery:
                with trio.fail_after(timeout):
                    ws = await wrap_client_stream(
                        nursery, stream, host_header, resource, extra_headers=headers
                    )
                try:
                    yield ws
                finally:
                    # Cancelled from outside, the connection's reader is cancelled too: no
                    # close handshake can complete, and the socket is just closed.
                    if trio.current_effective_deadline() > trio.current_time():
                        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                            await ws.aclose()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            await stream.aclose()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out
