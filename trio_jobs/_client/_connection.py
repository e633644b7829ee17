"""The narrow seam between the streams and the client that made them.

A stream sees only a :class:`StreamConnection` (the manner of httpx's
``_transports/base.py``): how to build and send a streamed request, how to open a
WebSocket, the timeout and the reconnect policy. :class:`HTTPConnection`, built by
:class:`~trio_jobs.JobClient`, is the real one; a test can hand a stream another (an
``httpx.MockTransport`` covers the HTTP side, a fake ``open_websocket`` the WebSocket side).
"""

from __future__ import annotations

import json as _json
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import trio

from ._reconnect import ReconnectPolicy

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

__all__ = ["HTTPConnection", "StreamConnection", "alone", "job_path"]

_STREAM_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}


def job_path(job_id: str) -> str:
    """The path of a job's resource, its id quoted (``/v1/jobs/{id}``)."""
    return f"/v1/jobs/{quote(job_id, safe='')}"


class StreamConnection(Protocol):
    """What a stream may use of its client."""

    @property
    def timeout(self) -> float:
        """Seconds for connecting, a handshake, and reading a body's tail after the signal."""

    @property
    def policy(self) -> ReconnectPolicy:
        """How the stream reconnects after a drop."""

    def stream_request(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None, json: Any = None
    ) -> httpx.Request:
        """A request for an SSE stream (``Accept: text/event-stream``, no read timeout)."""

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; the answer's body is left to be streamed."""

    def open_websocket(
        self, path: str, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        """A WebSocket to ``path`` with the client's own headers and ``headers``."""


@dataclass(frozen=True, slots=True)
class HTTPConnection:
    """The client's connection: its base URL, auth headers, httpx pool, timeout and policy."""

    base_url: str
    http: httpx.AsyncClient
    headers: Mapping[str, str]
    timeout: float
    policy: ReconnectPolicy
    transport: httpx.AsyncBaseTransport | None = None
    """The one transport ``http`` sends every request through, when it has no other
    (no proxy mounts): streams go to it directly."""

    def stream_request(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None, json: Any = None
    ) -> httpx.Request:
        # httpx's default read timeout would kill a quiet stream: keep-alives detect a dead peer.
        timeout = httpx.Timeout(self.timeout, read=None)
        if self.http.cookies:  # a server set cookies: httpx sends them back
            return self.http.build_request(
                method,
                path,
                json=json,
                headers={**_STREAM_HEADERS, **(headers or {})},
                timeout=timeout,
            )
        # What build_request makes, at a third of its cost (this is on every forwarded
        # job's path to its first token).
        merged = dict(self.http.headers)  # names in lower case
        for name, value in (*_STREAM_HEADERS.items(), *(headers or {}).items()):
            merged[name.lower()] = value
        content = None
        if json is not None:
            merged["content-type"] = "application/json"
            content = _json.dumps(
                json, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode()
        return httpx.Request(
            method,
            self.base_url + path,
            headers=merged,
            content=content,
            extensions={"timeout": timeout.as_dict()},
        )

    async def send(self, request: httpx.Request) -> httpx.Response:
        if self.transport is None or self.http.cookies:
            return await self.http.send(request, stream=True)
        # What httpx's send does for our requests (no auth flow, no redirects followed,
        # no hooks), without its layers: a stream's request is on a job's first-token path.
        response = await self.transport.handle_async_request(request)
        response.request = request
        return response

    def ws_url(self, path: str) -> str:
        """The ``ws://`` (``wss://``) URL of ``path`` below the base URL."""
        parts = urlsplit(self.base_url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))

    def open_websocket(
        self, path: str, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        raw = [(k.lower().encode(), v.encode()) for k, v in {**self.headers, **headers}.items()]
        return _open_websocket(self.ws_url(path), raw, self.timeout)


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
        with alone():
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


@contextmanager
def alone() -> Iterator[None]:
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


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out
