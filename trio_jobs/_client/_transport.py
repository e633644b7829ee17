"""An httpx transport that sends a request's head and its first body chunk in one write.

httpcore writes a request's head and each body chunk separately: on a connection with
``TCP_NODELAY`` (trio's default) a small JSON ``POST`` leaves as two segments, and the
server reads (and wakes for) each, then waits for the second before it can parse the body.
On loopback that second wake and read were ~0.3-0.6 ms of a forwarded job's time to its
first token, paid at every hop. :func:`coalescing_transport` holds the head until the
first body chunk (or the first read, for a request without a body) and writes both as
one: nothing else changes (a streamed body's later chunks go out as they come).
"""

from __future__ import annotations

import contextlib
import ssl
import typing

import httpcore
import httpx

__all__ = ["coalescing_transport"]


class _HeldHead(httpcore.AsyncNetworkStream):
    """A network stream whose first write after a read (a request's head) waits for the
    next write or read, which sends it along."""

    __slots__ = ("_held", "_hold", "_inner")

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._held = b""
        self._hold = True

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            await self._inner.write(buffer, timeout)
            return
        if self._hold:
            self._hold = False
            self._held = buffer
            return
        if self._held:
            buffer, self._held = self._held + buffer, b""
        await self._inner.write(buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            held, self._held = self._held, b""
            # As httpcore does with a body it could not write: read the answer anyway
            # (a server may answer, e.g. 413, and close before taking the request).
            with contextlib.suppress(httpcore.WriteError):
                await self._inner.write(held, timeout)
        self._hold = True
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held = b""
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._held:  # nothing is held before a handshake; never lose bytes if it was
            held, self._held = self._held, b""
            await self._inner.write(held, timeout)
        inner = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _HeldHead(inner)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's backend (trio's or anyio's, as it picks), its streams :class:`_HeldHead`."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _HeldHead(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return _HeldHead(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def coalescing_transport(**kwargs: typing.Any) -> httpx.AsyncHTTPTransport:
    """``httpx.AsyncHTTPTransport(**kwargs)`` writing each request's head together with
    its first body chunk (module doc). A transport whose pool is not httpcore's plain
    connection pool (a proxy) is returned as httpx built it."""
    transport = httpx.AsyncHTTPTransport(**kwargs)
    pool = transport._pool
    if type(pool) is httpcore.AsyncConnectionPool:
        pool._network_backend = _Backend(pool._network_backend)
    return transport
