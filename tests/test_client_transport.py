"""The HTTP/1.1 transport (``Http11Transport``) under httpx, against raw trio servers.

Each server here is a real socket on 127.0.0.1 that records what arrives and answers
bytes written by hand, so the tests see the exact wire: one write per request, kept-alive
connections reused (and not when they are stale), early answers, timeouts, TLS.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trustme

from trio_jobs._client._transport import Http11Transport

Handler = Callable[[trio.abc.Stream, "Server"], Awaitable[None]]


class Server:
    """A raw HTTP/1.1 server: counts connections, keeps each request's first read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.first_reads: list[bytes] = []
        self.port = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        with contextlib.suppress(trio.BrokenResourceError):
            await self.handler(stream, self)

    async def read_request(self, stream: trio.abc.Stream, buffer: bytes) -> tuple[bytes, bytes]:
        """One request (head and ``Content-Length`` body) and what came after it; an
        empty head when the client closed."""
        first = not buffer
        while True:
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) >= length:
                    return head + b"\r\n\r\n" + rest[:length], rest[length:]
            data = await stream.receive_some(65536)
            if not data:
                return b"", b""
            if first:
                self.first_reads.append(bytes(data))
                first = False
            buffer += data

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start(nursery: trio.Nursery, handler: Handler) -> Server:
    server = Server(handler)
    listeners = await nursery.start(trio.serve_tcp, server.serve, 0)
    server.port = listeners[0].socket.getsockname()[1]
    return server


def answer(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + extra
        + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )  # fmt: skip


async def echo(stream: trio.abc.Stream, server: Server) -> None:
    """Answers every request with its own method, path and body, keeping the connection."""
    rest = b""
    while True:
        request, rest = await server.read_request(stream, rest)
        if not request:
            return
        head, _, body = request.partition(b"\r\n\r\n")
        method, path, _ = head.split(b"\r\n")[0].split(b" ")
        got = {"method": method.decode(), "path": path.decode(), "body": body.decode()}
        await stream.send_all(answer(json.dumps(got).encode()))


async def test_a_request_goes_out_in_one_write_on_one_kept_connection(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery, echo)
    payload: dict[str, Any] = {"operation": "infer", "prompt": "x" * 500}
    async with httpx.AsyncClient(transport=Http11Transport()) as client:
        for _ in range(3):
            response = await client.post(f"{server.url}/v1/jobs?a=1", json=payload)
            got = response.json()
            assert (got["method"], got["path"]) == ("POST", "/v1/jobs?a=1")
            assert json.loads(got["body"]) == payload
        response = await client.get(f"{server.url}/health")
        assert response.json()["method"] == "GET"
        assert response.http_version == "HTTP/1.1" and response.reason_phrase == "OK"
    assert server.connections == 1
    assert len(server.first_reads) == 4
    for data in server.first_reads[:3]:  # each request whole in the server's first read
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"POST /v1/jobs?a=1 HTTP/1.1") and json.loads(body) == payload


async def test_a_streamed_body_and_a_chunked_answer(nursery: trio.Nursery) -> None:
    first_read = trio.Event()

    async def chunked(stream: trio.abc.Stream, server: Server) -> None:
        data = b""
        while b"0\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1\r\n \r\n"
        )
        await first_read.wait()
        await stream.send_all(b"5\r\nworld\r\n0\r\n\r\n")
        server.first_reads.append(data)
        await echo(stream, server)

    server = await start(nursery, chunked)

    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one ", b"two"):
            await trio.lowlevel.checkpoint()
            yield part

    transport = Http11Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        async with client.stream("PUT", f"{server.url}/up", content=parts()) as response:
            pieces = []
            async for piece in response.aiter_bytes():
                pieces.append(piece)
                first_read.set()
        assert pieces == [b"hello ", b"world"]  # the chunks that came in one read, joined
        assert transport.has_idle(server.url)  # read to its end: kept
        assert (await client.get(f"{server.url}/again")).json()["path"] == "/again"
    sent = server.first_reads[0]
    assert b"transfer-encoding: chunked" in sent.lower() and b"one " in sent and b"two" in sent
    assert server.connections == 1


async def test_an_unfinished_answer_closes_its_connection(nursery: trio.Nursery) -> None:
    async def endless(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, b"")
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            await stream.send_all(b"5\r\ntick\n\r\n")
            await trio.sleep(0.01)

    server = await start(nursery, endless)
    transport = Http11Transport()
    for _ in range(2):
        # the transport's own body (httpx's nested generators would outlive a break)
        response = await transport.handle_async_request(httpx.Request("GET", server.url))
        assert isinstance(response.stream, httpx.AsyncByteStream)
        async for chunk in response.stream:
            assert chunk.startswith(b"tick")
            break
        await response.aclose()
        assert not transport.has_idle(server.url)
    await transport.aclose()
    assert server.connections == 2


async def test_a_stale_connection_is_not_reused(nursery: trio.Nursery) -> None:
    """A server that closes a connection after each answer (without saying so): the
    closed connection is noticed before the next request goes out on it."""
    closes = trio.Semaphore(0, max_value=10)

    async def one_shot(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, b"")
        await stream.send_all(answer(b"{}"))
        await stream.aclose()  # on loopback our side is readable (EOF) once this returns
        closes.release()

    server = await start(nursery, one_shot)
    transport = Http11Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            assert (await client.post(f"{server.url}/x", json={})).status_code == 200
            await closes.acquire()
            assert not transport.has_idle(server.url)
    assert server.connections == 3


async def test_a_connection_lost_as_a_request_goes_out(nursery: trio.Nursery) -> None:
    """The server takes a second request on a kept connection and drops it unanswered:
    a GET is sent again on a new connection, a POST (which may have been acted on)
    fails with httpx's error."""

    async def drops_second(stream: trio.abc.Stream, server: Server) -> None:
        _request, rest = await server.read_request(stream, b"")
        await stream.send_all(answer(b"{}"))
        await server.read_request(stream, rest)  # then gone without an answer

    server = await start(nursery, drops_second)
    async with httpx.AsyncClient(transport=Http11Transport()) as client:
        await client.get(f"{server.url}/a")
        assert (await client.get(f"{server.url}/b")).status_code == 200
        assert server.connections == 2
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"{server.url}/c", json={})
    assert server.connections == 2


async def test_an_early_answer_to_an_unsent_body_is_read(nursery: trio.Nursery) -> None:
    async def refuses(stream: trio.abc.Stream, server: Server) -> None:
        await stream.receive_some(1024)
        await stream.send_all(answer(b'{"error": "too large"}', b"413 Payload Too Large"))
        await stream.aclose()

    server = await start(nursery, refuses)
    async with httpx.AsyncClient(transport=Http11Transport()) as client:
        response = await client.post(f"{server.url}/v1/jobs", content=b"x" * 20_000_000)
    assert response.status_code == 413 and response.json() == {"error": "too large"}


async def test_errors_are_httpx_errors(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.abc.Stream, server: Server) -> None:
        await trio.sleep_forever()

    async def garbage(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, b"")
        await stream.send_all(b"NOT HTTP\r\n\r\n")

    quiet, broken = await start(nursery, silent), await start(nursery, garbage)
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    transport = Http11Transport()
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{closed}/")
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{quiet.url}/", timeout=httpx.Timeout(5.0, read=0.05))
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{broken.url}/")
        with pytest.raises(httpx.UnsupportedProtocol):
            await transport.handle_async_request(httpx.Request("GET", "ftp://127.0.0.1/"))
    assert not transport.has_idle(quiet.url)


async def test_https_with_verification(nursery: trio.Nursery) -> None:
    authority = trustme.CA()
    cert = authority.issue_cert("localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)

    async def tls_echo(stream: trio.abc.Stream, server: Server) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await echo(tls, server)

    server = await start(nursery, tls_echo)
    client_context = ssl.create_default_context()
    authority.configure_trust(client_context)
    url = f"https://localhost:{server.port}/secure"
    async with httpx.AsyncClient(transport=Http11Transport(verify=client_context)) as client:
        for _ in range(2):
            assert (await client.post(url, json={"a": 1})).json()["body"] == '{"a":1}'
    assert server.connections == 1
    async with httpx.AsyncClient(transport=Http11Transport()) as client:  # not trusted
        with pytest.raises(httpx.ConnectError):
            await client.get(url)


async def test_idle_connections_expire_and_are_capped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    server = await start(nursery, echo)
    limits = httpx.Limits(max_keepalive_connections=2, keepalive_expiry=0.05)
    transport = Http11Transport(limits=limits)
    async with httpx.AsyncClient(transport=transport) as client:
        async with trio.open_nursery() as requests:
            for _ in range(4):
                requests.start_soon(client.get, f"{server.url}/slow")
        assert server.connections == 4
        assert transport.has_idle(server.url)
        await trio.sleep(0.1)
        assert not transport.has_idle(server.url)
        await client.get(f"{server.url}/after")
    assert server.connections == 5


async def test_a_kept_connection_on_a_high_descriptor_is_reused(nursery: trio.Nursery) -> None:
    """A busy daemon's sockets have descriptors above 1023, where ``select()`` fails:
    the stale check must still tell a live connection from a closed one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = await start(nursery, echo)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        async with httpx.AsyncClient(transport=Http11Transport()) as client:
            for _ in range(3):
                assert (await client.get(f"{server.url}/x")).status_code == 200
    finally:
        for fd in filler:
            os.close(fd)
    assert server.connections == 1


async def test_expired_connections_of_every_origin_are_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A connection left idle to a server no longer asked is closed once expired, at a
    later request to another (it does not linger half-closed until the pool closes)."""
    closed = trio.Event()

    async def noting_close(stream: trio.abc.Stream, server: Server) -> None:
        await echo(stream, server)
        closed.set()

    first, second = await start(nursery, noting_close), await start(nursery, echo)
    transport = Http11Transport(limits=httpx.Limits(keepalive_expiry=5.0))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(f"{first.url}/once")
        await trio.sleep(6.0)
        assert not closed.is_set()
        await client.get(f"{second.url}/other")
        with trio.fail_after(1):
            await closed.wait()


async def test_a_job_client_goes_through_a_proxy_the_environment_names(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``JobClient``'s default transport does not speak to proxies, so a client whose
    server the environment proxies keeps httpx's own; NO_PROXY hosts go direct."""
    from trio_jobs import JobClient

    async def proxy(stream: trio.abc.Stream, server: Server) -> None:
        await server.read_request(stream, b"")
        await stream.send_all(answer(b'{"status": "proxied"}'))

    via = await start(nursery, proxy)
    direct = await start(nursery, echo)
    monkeypatch.setenv("HTTP_PROXY", via.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with JobClient("http://10.255.255.1:7833") as client:
        assert await client.health() == {"status": "proxied"}
    assert via.first_reads[0].startswith(b"GET http://10.255.255.1:7833/health HTTP/1.1")
    async with JobClient(direct.url) as client:
        assert (await client.health())["path"] == "/health"
