"""HTTP/1.1 connections served with h11 directly, one task per connection.

hypercorn's HTTP/1.1 path wraps h11 in four layers (``TCPServer``, ``ProtocolWrapper``,
``H11Protocol``, ``HTTPStream``), runs each request's app in a task of its own fed by a
memory channel, and writes a response's head and body with a send each. On fresh
connections (a job's ``POST`` and its stream, a connection each) that was about a third of
a server's CPU.

:class:`Http11Connection` parses requests with h11 and calls the ASGI app in the
connection's own task. The app's ``receive`` reads the socket itself when it needs more
(a body, or to notice the client leaving), so no task feeds it; ``send`` writes a
response's head, body and end in one send when it can (:data:`HOLD_HEAD`). What it
promises is hypercorn's: the same scope, ``Date`` and ``Server`` headers,
``keep_alive_timeout`` for idle connections (closed at once when the server stops),
``keep_alive_max_requests``, ``h11_max_incomplete_size``, ``server_names``, a 400 for a
malformed request, a 500 for an app that fails before answering, ``http.disconnect``
once the response is sent or the client leaves.

A request that asks to switch protocols (a WebSocket handshake, ``h2c``) or an HTTP/2
preface is handed, with the bytes read so far, to hypercorn's own connection
(:class:`~trio_jobs.http._connection.Connection`), which serves the rest of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote
from wsgiref.handlers import format_date_time

import h11
import trio
from hypercorn.config import Config
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper
from hypercorn.utils import parse_socket_addr

__all__ = ["HOLD_HEAD", "Exchange", "Http11Connection", "IdleDeadline", "send_whole"]

HOLD_HEAD = "trio_jobs.hold_head"
"""A key of an ``http.response.start`` message: true when the app sends a body message
right after it, so the head may wait for it and go in the same write. A response with a
``Content-Length`` is held anyway; other heads (streams) are written at once, as
hypercorn does, so that a client sees them before a slow first chunk."""

_STATE_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
_DISCONNECT = {"type": "http.disconnect"}
_NO_BODY_STATUSES = frozenset({204, 304})
_DRAIN_BYTES = 1 << 20
_DRAIN_S = 1.0


class _DateHeader:
    """The ``Date`` header, formatted once a second rather than once a response."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = format_date_time(now).encode("ascii")
        return self._value


_date = _DateHeader()


def _switches_protocol(request: h11.Request) -> bool:
    """The request asks to switch protocols (WebSocket, h2c) or is an HTTP/2 preface."""
    if request.method == b"PRI":
        return True
    return any(name == b"upgrade" for name, _ in request.headers)


def _raw_head(request: h11.Request) -> bytes:
    """The request's head as the client wrote it (header names in their own case)."""
    lines = [b"%s %s HTTP/%s" % (request.method, request.target, request.http_version)]
    lines.extend(name + b": " + value for name, value in request.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Exchange:
    """One request and its response: the app's ``receive`` and ``send``."""

    __slots__ = (
        "_body_done",
        "_conn",
        "_head",
        "_response_done",
        "_suppress",
        "closing",
        "connection",
        "scope",
        "started",
        "status",
    )

    def __init__(self, connection: Http11Connection, scope: dict[str, Any], close: bool) -> None:
        self.connection = connection
        self._conn = connection.h11
        self.scope = scope
        self.closing = close
        self._head: h11.Response | None = None
        self._suppress = scope["method"] == "HEAD"
        self._body_done = self._conn.their_state is not h11.SEND_BODY
        self._response_done: trio.Event | None = None
        self.started = False
        self.status = 0

    @property
    def complete(self) -> bool:
        return self._conn.our_state is not h11.SEND_RESPONSE and (
            self._conn.our_state is not h11.SEND_BODY
        )

    def receive_nowait(self) -> dict[str, Any]:
        """The next message if it needs no waiting; ``trio.WouldBlock`` otherwise."""
        if self.complete or self.connection.broken:
            return _DISCONNECT
        if self._body_done:
            raise trio.WouldBlock
        message = self._next_body()
        if message is None:
            raise trio.WouldBlock
        return message

    def _next_body(self) -> dict[str, Any] | None:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError:
            self.connection.broken = True
            return _DISCONNECT
        if isinstance(event, h11.Data):
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self._body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if event is h11.NEED_DATA:
            return None
        # ConnectionClosed (the client left mid-body) or anything unexpected.
        self.connection.broken = True
        return _DISCONNECT

    async def receive(self) -> dict[str, Any]:
        """ASGI ``receive``: the body's messages, read from the socket as asked; then
        ``http.disconnect`` once the response is sent or the client leaves."""
        connection = self.connection
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                pass
            if self._body_done:
                # Nothing more is read for this request: wait for the client to leave
                # (end of file) or the response to end.
                await self._wait_for_disconnect()
                continue
            if self._conn.they_are_waiting_for_100_continue:
                await connection.write(
                    self._conn.send(
                        h11.InformationalResponse(
                            status_code=100, headers=connection.server_headers()
                        )
                    )
                )
            await connection.read()

    async def _wait_for_disconnect(self) -> None:
        conn = self._conn
        connection = self.connection
        pending, closed = conn.trailing_data
        if not closed and len(pending) < connection.config.h11_max_incomplete_size:
            # Read on: an end of file means the client left. A pipelined next request
            # stays in h11's buffer for after this response.
            await connection.read()
            if conn.trailing_data[1]:
                connection.broken = True
            return
        if self._response_done is None:
            self._response_done = trio.Event()
        await self._response_done.wait()

    async def send(self, message: Any) -> None:
        """ASGI ``send``."""
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = status = int(message["status"])
            headers = []
            for name, value in message.get("headers", ()):
                if name[:1] == b":":
                    raise ValueError("Pseudo headers are not valid")
                headers.append((bytes(name).strip(), bytes(value).strip()))
            headers.extend(self.connection.server_headers())
            if self.closing:
                headers.append((b"connection", b"close"))
            self._suppress = self._suppress or 100 <= status < 200 or status in _NO_BODY_STATUSES
            head = h11.Response(status_code=status, headers=headers)
            if message.get(HOLD_HEAD) or any(name == b"content-length" for name, _ in headers):
                self._head = head  # sent with the body, which follows at once
            else:  # a stream: its head goes now, whenever its body comes
                await self.connection.write(self._conn.send(head))
        elif kind == "http.response.body":
            if not self.started or self.complete:
                raise RuntimeError(f"unexpected ASGI message {kind!r}")
            if self.connection.broken:
                return  # the client left: receive says so
            conn = self._conn
            out = b""
            if self._head is not None:
                out = conn.send(self._head)
                self._head = None
            body = message.get("body", b"")
            if body and not self._suppress:
                out += conn.send(h11.Data(data=body))
            more = message.get("more_body", False)
            if not more:
                out += conn.send(h11.EndOfMessage())
            if out:
                await self.connection.write(out)
            if not more:
                self.finished()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def finished(self) -> None:
        """The response is over (sent, or never to be): wake whoever waits on it."""
        if self._response_done is not None:
            self._response_done.set()


async def send_whole(lock: trio.Lock, stream: trio.abc.SendStream, data: bytes) -> bool:
    """Write ``data`` whole under ``lock`` (taken without a scheduler trip when free),
    shielded: a half-written response would break the connection. False when the
    connection is broken or closed."""
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()
    try:
        with trio.CancelScope(shield=True):
            await stream.send_all(data)
    except _STATE_ERRORS:
        return False
    finally:
        lock.release()
    return True


class IdleDeadline:
    """A connection whose reads run under one cancel scope (``_reads``): between requests
    its deadline is the keep-alive timeout, or now once the server stops; it is in the
    server's set of idle connections (``_idle``) meanwhile."""

    _idle: set[Any]
    _reads: trio.CancelScope
    config: Config
    context: WorkerContext

    def _set_idle(self, idle: bool) -> None:
        if idle:
            self._idle.add(self)
            if self.context.terminated.is_set():
                self._reads.deadline = -math.inf
            else:
                self._reads.deadline = trio.current_time() + self.config.keep_alive_timeout
        else:
            self._idle.discard(self)
            self._reads.deadline = math.inf

    def close_idle(self) -> None:
        """The server stops: close this connection now if it is idle."""
        if self in self._idle:
            self._reads.deadline = -math.inf


class Http11Connection(IdleDeadline):
    """One plain-TCP HTTP/1.1 connection (module doc).

    ``idle``: the server's set of idle connections, closed at once when it stops;
    ``fallback``: makes hypercorn's connection for the same socket, for protocol switches."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: dict[str, Any],
        stream: trio.SocketStream,
        *,
        idle: set[Any],
        fallback: Callable[[trio.SocketStream], Any],
    ) -> None:
        self.app = app
        self.config = config
        self.context = context
        self.state = state
        self.stream = stream
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=config.h11_max_incomplete_size
        )
        self.broken = False
        self._reading = False
        self._read_done = trio.lowlevel.ParkingLot()
        self._idle = idle
        self._fallback = fallback
        self._reads = trio.CancelScope()
        self._send_lock = trio.Lock()
        self._server_header = (
            [(b"server", b"hypercorn-h11")] if config.include_server_header else []
        )
        self._server_headers_plain = not config.alt_svc_headers and not config._quic_addresses

    def server_headers(self) -> list[tuple[bytes, bytes]]:
        """``Date`` and ``Server`` (and alt-svc) as hypercorn adds them."""
        if not self._server_headers_plain:
            return self.config.response_headers("h11")
        headers = [(b"date", _date.value())] if self.config.include_date_header else []
        headers.extend(self._server_header)
        return headers

    async def read(self) -> None:
        """Read more from the socket into h11 (an end of file included; a broken
        connection counts as one). Only one task reads at a time: another that asks
        meanwhile returns once that read is done."""
        if self._reading:
            await self._read_done.park()
            return
        self._reading = True
        try:
            data = bytes(await self.stream.receive_some(65536))
        except _STATE_ERRORS:
            self.broken = True
            data = b""
        finally:
            self._reading = False
            self._read_done.unpark_all()
        self.h11.receive_data(data)

    async def write(self, data: bytes) -> None:
        """Write ``data`` whole; a broken connection is noted, not raised."""
        if not await send_whole(self._send_lock, self.stream, data):
            self.broken = True

    async def run(self) -> None:
        stream = self.stream
        handed_over = False
        try:
            sock = stream.socket
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
            handed_over = await self._serve(client, server)
        except OSError:
            pass
        except _STATE_ERRORS:
            pass
        finally:
            self._idle.discard(self)
            if not handed_over:
                await self._close()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            if not self.h11.trailing_data[1] and not self.broken:
                try:
                    await self.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    pass
                else:
                    await self._drain()
            self.stream.socket.close()

    async def _drain(self) -> None:
        """Before closing with a request body still coming, read (and drop) a little of
        it, so the client reads the answer instead of a reset."""
        if self.h11.their_state is not h11.SEND_BODY:
            return
        left = _DRAIN_BYTES
        with trio.move_on_after(_DRAIN_S):
            while left > 0:
                try:
                    data = await self.stream.receive_some(65536)
                except _STATE_ERRORS:
                    return
                if not data:
                    return
                left -= len(data)

    async def _serve(self, client: Any, server: Any) -> bool:
        """Serve requests until the connection closes; True if it was handed over."""
        conn = self.h11
        requests = 0
        with self._reads:
            self._set_idle(True)
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._refuse(exc.error_status_hint)
                    return False
                if event is h11.NEED_DATA:
                    await self.read()
                    continue
                if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
                    return False
                if _switches_protocol(event):
                    self._set_idle(False)
                    await self._hand_over(event)
                    return True
                if self._reads.cancel_called:  # timed out as the request came
                    return False
                self._set_idle(False)
                requests += 1
                if not await self._exchange(event, client, server, requests):
                    return False
                self._skip_body()
                if (
                    self.broken
                    or self.context.terminated.is_set()
                    or conn.our_state is not h11.DONE
                    or conn.their_state is not h11.DONE
                ):
                    return False
                conn.start_next_cycle()
                self._set_idle(True)
        return False  # idle past the keep-alive timeout, or the server stops

    async def _exchange(
        self, request: h11.Request, client: Any, server: Any, requests: int
    ) -> bool:
        """Run the app for one request; False if the connection cannot go on."""
        config = self.config
        target = request.target
        path, _, query_string = target.partition(b"?")
        headers = (
            request.headers.raw_items() if config.h11_pass_raw_headers else list(request.headers)
        )
        scope: dict[str, Any] = {
            "type": "http",
            "http_version": request.http_version.decode(),
            "asgi": {"spec_version": "2.1", "version": "3.0"},
            "method": request.method.decode("ascii").upper(),
            "scheme": "http",
            "path": unquote(path.decode("ascii")),
            "raw_path": path,
            "query_string": query_string,
            "root_path": config.root_path,
            "headers": headers,
            "client": client,
            "server": server,
            "state": self.state.copy(),
            "extensions": {},
        }
        close = requests >= config.keep_alive_max_requests
        exchange = Exchange(self, scope, close)
        started = time.time()
        if config.server_names and not self._valid_server_name(request):
            await self._error_response(exchange, 404)
            return False
        try:
            await self.app(
                scope,  # type: ignore[arg-type]
                exchange.receive,  # type: ignore[arg-type]
                exchange.send,
                trio.to_thread.run_sync,
                trio.from_thread.run,
            )
        except trio.Cancelled:
            raise
        except BaseException as error:
            if isinstance(error, BaseExceptionGroup):
                _, others = error.split(trio.Cancelled)
                if others is None:
                    raise
            elif not isinstance(error, Exception):
                raise
            await config.log.exception("Error in ASGI Framework")
            if not exchange.started:
                await self._error_response(exchange, 500)
            exchange.finished()
            return False
        exchange.finished()
        if not exchange.complete:
            if not exchange.started and not self.broken:
                await self._error_response(exchange, 500)
            return False
        if config.accesslog is not None:
            await config.log.access(
                scope,  # type: ignore[arg-type]
                {"status": exchange.status, "headers": []},
                time.time() - started,
            )
        return True

    def _skip_body(self) -> None:
        """Take what is left of a request body the app did not read from h11's buffer
        (for a request without a body: its end)."""
        conn = self.h11
        while conn.their_state is h11.SEND_BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return

    def _valid_server_name(self, request: h11.Request) -> bool:
        for name, value in request.headers:
            if name == b"host":
                return value.decode() in self.config.server_names
        return "" in self.config.server_names

    async def _error_response(self, exchange: Exchange, status: int) -> None:
        """A bare error answer that closes the connection (hypercorn's)."""
        if self.broken:
            return
        headers = [(b"content-length", b"0"), (b"connection", b"close"), *self.server_headers()]
        try:
            data = self.h11.send(h11.Response(status_code=status, headers=headers))
            data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        exchange.started = True
        exchange.status = status
        await self.write(data)

    async def _refuse(self, status: int) -> None:
        """Answer a malformed request (when an answer is still possible) and close."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            headers = [(b"content-length", b"0"), (b"connection", b"close")]
            headers.extend(self.server_headers())
            try:
                data = self.h11.send(h11.Response(status_code=status, headers=headers))
                data += self.h11.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                return
            await self.write(data)

    async def _hand_over(self, request: h11.Request) -> None:
        """Serve the rest of the connection with hypercorn's own protocols, from this
        request on."""
        preread = _raw_head(request) + self.h11.trailing_data[0]
        await self._fallback(self.stream).run(preread=preread)
