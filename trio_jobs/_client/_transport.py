"""HTTP/1.1 for httpx on trio streams and h11, without httpcore.

A job's forward and a worker's upstream call each make one streamed request per job on
a kept-alive connection, and on loopback httpcore's pool and connection machinery was
most of that request's cost: about 0.4 ms of every hop's time to its first token (a
sequential streamed ``POST`` cost 500 µs through httpx on httpcore, 280 µs through httpx
on this transport). :class:`Http11Transport` does what those hops need and no more:
HTTP/1.1 (``http`` and ``https``) with kept-alive connections per origin, each request's
head and body written in one send, httpx's timeouts (``connect``, ``read``, ``write``)
and httpx's exceptions. Proxies are httpx's business (its environment proxies mount
their own transport); HTTP/2 is not spoken.
"""

from __future__ import annotations

import select
import ssl
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple

import h11
import httpx
import trio

__all__ = ["Http11Transport", "Reply", "environment_proxy"]

_READ_SIZE = 65536
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "PUT", "TRACE"})

Origin = tuple[str, str, int]
"""``(scheme, host, port)``."""


class _Connection:
    """One kept-alive connection: its stream, h11 state and when it went idle."""

    __slots__ = ("h11", "idle_since", "socket", "stream")

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.socket = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def usable(self, now: float, expiry: float) -> bool:
        """Idle for less than ``expiry`` and quiet: a peer that closed it (or sent
        something unasked) makes its socket readable."""
        if now - self.idle_since >= expiry:
            return False
        try:
            poller = select.poll()  # not select(): it fails on descriptors above 1023
            poller.register(self.socket.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class Http11Transport(httpx.AsyncBaseTransport):
    """httpx's transport for HTTP/1.1 on trio (module doc).

    Args:
        verify: the TLS context for ``https`` (or False: no verification; True: httpx's
            default context).
        limits: ``max_keepalive_connections`` idle connections are kept per origin, each
            for ``keepalive_expiry`` seconds (default 5 s); connections are not capped.
    """

    def __init__(
        self, *, verify: ssl.SSLContext | bool = True, limits: httpx.Limits | None = None
    ) -> None:
        self._verify = verify
        self._ssl: ssl.SSLContext | None = verify if isinstance(verify, ssl.SSLContext) else None
        limits = limits or httpx.Limits()
        self._max_idle = (
            limits.max_keepalive_connections
            if limits.max_keepalive_connections is not None
            else 1 << 30
        )
        self._expiry = limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False
        self._pruned = 0.0

    # ---- the pool ------------------------------------------------------------------------

    def has_idle(self, url: str | httpx.URL) -> bool:
        """Whether a request to ``url``'s origin would find a connection ready."""
        origin = _origin(httpx.URL(url))
        now = trio.current_time()
        return any(c.usable(now, self._expiry) for c in self._idle.get(origin, ()))

    def _take(self, origin: Origin) -> _Connection | None:
        now = trio.current_time()
        if now - self._pruned > 1.0:
            self._prune(now)
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable(now, self._expiry):
                return conn
            _close_now(conn)
        return None

    def _prune(self, now: float) -> None:
        """Close the idle connections past their expiry, of every origin (a server closes
        its side after its own keep-alive timeout; ours would linger half-closed)."""
        self._pruned = now
        for origin, conns in list(self._idle.items()):
            live = [c for c in conns if now - c.idle_since < self._expiry]
            for conn in conns:
                if now - conn.idle_since >= self._expiry:
                    _close_now(conn)
            if live:
                self._idle[origin] = live
            else:
                del self._idle[origin]

    def _give_back(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if self._closed or len(idle) >= self._max_idle:
            _close_now(conn)
            return
        conn.idle_since = trio.current_time()
        idle.append(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        try:
            with trio.fail_after(_seconds(timeout)):
                tcp = await trio.open_tcp_stream(host, port)
                stream: trio.abc.Stream = tcp
                if scheme == "https":
                    if self._ssl is None:  # built once: loading the CA bundle takes long
                        self._ssl = httpx.create_ssl_context(verify=self._verify)
                    tls = trio.SSLStream(
                        tcp, self._ssl, server_hostname=host, https_compatible=True
                    )
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
                    stream = tls
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        return _Connection(stream, tcp.socket)

    # ---- a request -----------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        stream = request.stream
        # A body already in memory (JSON, bytes) goes out with the head in one write.
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else stream
        reply = await self.open(
            request.method,
            url,
            request.headers.raw,
            body,
            request.extensions.get("timeout", {}),
        )
        return httpx.Response(
            reply.status,
            headers=reply.headers,
            stream=reply.body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reply.reason},
        )

    async def open(
        self,
        method: str,
        url: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        body: bytes | httpx.AsyncByteStream | Any,
        timeouts: Mapping[str, float | None],
    ) -> Reply:
        """Send a request and read its answer's head (below httpx's client, for the hops
        where its layers cost more than the request). ``headers`` must hold ``Host`` and
        the body's framing (``Content-Length`` or ``Transfer-Encoding``); ``body`` is the
        whole body or a stream of its pieces; ``timeouts`` as httpx's (``connect``,
        ``read``, ``write``; missing or None: none). Raises httpx's transport errors."""
        if self._closed:
            raise RuntimeError("the transport is closed")
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = _origin(url)
        conn = self._take(origin)
        if conn is not None:
            try:
                return await self._exchange(origin, conn, method, url, headers, body, timeouts)
            except _Stale as exc:
                # A kept-alive connection the server closed as the request went out: the
                # request is sent again on a new one only when that is harmless.
                if method not in _IDEMPOTENT or not isinstance(body, bytes):
                    raise exc.error from None
        conn = await self._connect(origin, timeouts.get("connect"))
        try:
            return await self._exchange(origin, conn, method, url, headers, body, timeouts)
        except _Stale as exc:
            raise exc.error from None

    async def _exchange(
        self,
        origin: Origin,
        conn: _Connection,
        method: str,
        url: httpx.URL,
        headers: list[tuple[bytes, bytes]],
        body: bytes | Any,
        timeouts: Mapping[str, float | None],
    ) -> Reply:
        """Send the request on ``conn`` and read the answer's head. Raises :class:`_Stale`
        when the connection closed before any byte of an answer came."""
        ok = False
        unsent: _Stale | None = None
        try:
            head = h11.Request(method=method, target=url.raw_path or b"/", headers=headers)
            out = conn.h11.send(head) or b""
            try:
                if isinstance(body, bytes):
                    if body:
                        out += conn.h11.send(h11.Data(data=body)) or b""
                    out += conn.h11.send(h11.EndOfMessage()) or b""
                    await _write(conn, out, timeouts.get("write"))
                else:
                    await _write_streamed(conn, body, out, timeouts.get("write"))
            except _Stale as exc:
                # A server may answer (413) and close before taking the whole request:
                # its answer is read all the same, as httpcore does.
                unsent = exc
            read_s = timeouts.get("read")
            while True:
                try:
                    event = await _next_event(conn, read_s)
                except httpx.ReadError as exc:
                    raise unsent or _Stale(exc) from exc
                except _Stale as exc:
                    raise unsent or exc from None
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    break
                raise unsent or _Stale(
                    httpx.RemoteProtocolError("the server closed the connection")
                )
            ok = True
        except h11.RemoteProtocolError as exc:
            raise unsent or httpx.RemoteProtocolError(str(exc)) from exc
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        finally:
            if not ok:
                await conn.aclose()
        return Reply(
            event.status_code,
            bytes(event.reason),
            [(bytes(k), bytes(v)) for k, v in event.headers],
            _Body(self, origin, conn, read_s),
        )


class Reply(NamedTuple):
    """An answer's head and its body (read it to its end, or ``aclose`` it)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: _Body


async def _write_streamed(
    conn: _Connection, stream: Any, head: bytes, timeout: float | None
) -> None:
    """A body that comes in pieces: the head goes with the first one."""
    out = head
    async for chunk in stream:
        if chunk:
            out += conn.h11.send(h11.Data(data=chunk)) or b""
            await _write(conn, out, timeout)
            out = b""
    out += conn.h11.send(h11.EndOfMessage()) or b""
    await _write(conn, out, timeout)


class _Stale(Exception):
    """The connection failed before an answer began; ``error`` is what to raise."""

    def __init__(self, error: httpx.TransportError) -> None:
        super().__init__(str(error))
        self.error = error


class _Body(httpx.AsyncByteStream):
    """A response's body; at its end the connection goes back to the pool.

    Each step hands out everything that arrived (the chunks of a chunked body that came
    in one read are joined), so a stream of small events costs one step per read."""

    __slots__ = ("_conn", "_next", "_origin", "_pool", "_read_s")

    def __init__(
        self, pool: Http11Transport, origin: Origin, conn: _Connection, read_s: float | None
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Connection | None = conn
        self._read_s = read_s
        self._next: Any = None
        """An event read past the data handed out (the body's end), for the next step."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        h = conn.h11
        try:
            event, self._next = self._next, None
            if event is None:
                event = await _next_event(conn, self._read_s)
            if type(event) is h11.Data:
                data = bytes(event.data)
                while True:  # what else is already in the buffer, without waiting
                    more = h.next_event()
                    if type(more) is not h11.Data:
                        if more is not h11.NEED_DATA:
                            self._next = more
                        return data
                    data += more.data
        except h11.RemoteProtocolError as exc:
            await self.aclose()
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except BaseException:
            await self.aclose()
            raise
        self._conn = None
        if type(event) is h11.EndOfMessage:
            if h.our_state is h11.DONE and h.their_state is h11.DONE:
                h.start_next_cycle()
                self._pool._give_back(self._origin, conn)
            else:
                await conn.aclose()
            raise StopAsyncIteration
        await conn.aclose()
        raise httpx.RemoteProtocolError("the server closed the connection mid-body")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()


async def _next_event(conn: _Connection, read_s: float | None) -> Any:
    h = conn.h11
    while True:
        event = h.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            if read_s is None:  # a stream's usual case: no cancel scope per read
                data = await conn.stream.receive_some(_READ_SIZE)
            else:
                with trio.fail_after(read_s):
                    data = await conn.stream.receive_some(_READ_SIZE)
        except trio.TooSlowError:
            raise httpx.ReadTimeout("no answer within the read timeout") from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if not data and h.their_state is h11.SEND_RESPONSE and not h.trailing_data[0]:
            raise _Stale(httpx.RemoteProtocolError("the server closed the connection unanswered"))
        h.receive_data(bytes(data))


async def _write(conn: _Connection, data: bytes, timeout: float | None) -> None:
    try:
        if timeout is None:
            await conn.stream.send_all(data)
        else:
            with trio.fail_after(timeout):
                await conn.stream.send_all(data)
    except trio.TooSlowError:
        raise httpx.WriteTimeout("the request could not be sent within the timeout") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise _Stale(httpx.WriteError(str(exc) or type(exc).__name__)) from exc


def _close_now(conn: _Connection) -> None:
    """Close an idle connection without waiting (its TLS close is not worth a wait)."""
    conn.socket.close()


def environment_proxy(url: httpx.URL) -> str | None:
    """The proxy ``HTTP(S)_PROXY``/``ALL_PROXY`` name for ``url`` unless ``NO_PROXY``
    exempts its host (the standard library's reading of them). This transport does not
    go through proxies: who would use it for such a URL keeps httpx's own."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    return proxy


def _origin(url: httpx.URL) -> Origin:
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.scheme, url.host, port


def _seconds(timeout: float | None) -> float:
    return float("inf") if timeout is None else float(timeout)
