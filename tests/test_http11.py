"""The HTTP/1.1 connection (``trio_jobs.http._http11``) through real sockets, in raw bytes:
what a server must get right below the app (pipelining, ``Expect: 100-continue``, HEAD,
HTTP/1.0, malformed requests, an app that fails, clients that leave mid-body, a protocol
switch after a keep-alive request, a head written with its body)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
from hypercorn.config import Config

from trio_jobs import JobRegistry, narrate
from trio_jobs.http import create_app, serve
from trio_jobs.http._connection import worker_serve
from trio_jobs.http._http11 import Http11Connection

CAP = 10.0


async def _executor(job_id: str, payload: Any) -> None:
    narrate("tick", "one")
    if payload.get("block"):
        await trio.sleep_forever()


@asynccontextmanager
async def _server(**options: Any) -> AsyncIterator[tuple[int, JobRegistry, Any]]:
    registry = JobRegistry()
    app = create_app(registry, _executor, **options)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, app)
        yield int(url.rsplit(":", 1)[1]), registry, app
        nursery.cancel_scope.cancel()


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def _responses(
    stream: trio.SocketStream, count: int
) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """``count`` whole responses read with an h11 client connection."""
    conn = h11.Connection(h11.CLIENT)
    out = []
    for _ in range(count):
        # A client connection must send a request before it may read a response.
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        out.append((status, headers, body))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return out


def _post(body: bytes, *extra: str) -> bytes:
    head = [
        "POST /v1/jobs HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_pipelined_requests_are_answered_in_order() -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, registry, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                body = json.dumps({"n": 1}).encode()
                await stream.send_all(
                    _post(body) + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + _post(body)
                )
                answers = await _responses(stream, 3)
            assert [status for status, _, _ in answers] == [201, 200, 201]
            ids = {json.loads(answers[i][2])["job_id"] for i in (0, 2)}
            assert len(ids) == 2 and all(registry.get(job_id) for job_id in ids)


async def test_expect_100_continue_gets_its_interim_answer() -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, registry, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                body = json.dumps({"n": 1}).encode()
                request = _post(body, "Expect: 100-continue")
                await stream.send_all(request[: -len(body)])  # the head alone
                interim = await stream.receive_some(65536)
                assert interim.startswith(b"HTTP/1.1 100 ")
                await stream.send_all(body)
                [(status, _, answer)] = await _responses(stream, 1)
            assert status == 201
            assert registry.get(json.loads(answer)["job_id"]) is not None


async def test_head_has_no_body_and_the_connection_goes_on() -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, _, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += await stream.receive_some(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 ") and rest == b""
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                more = await stream.receive_some(65536)
                assert more.startswith(b"HTTP/1.1 200 ")


async def test_http_1_0_is_answered_and_closed() -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, _, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                data = await _read_until_closed(stream)
            assert data.startswith(b"HTTP/1.1 200 ")
            assert data.endswith(b"}")  # the whole JSON body, then the server closed


@pytest.mark.parametrize(
    "garbage",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"],
)
async def test_a_malformed_request_is_400_and_closed(garbage: bytes) -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, registry, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(garbage)
                data = await _read_until_closed(stream)
            assert data.startswith(b"HTTP/1.1 400 ")
            assert b"connection: close" in data.lower()
            assert not list(registry.list_jobs())


async def test_a_failing_app_gets_500_and_the_server_lives_on() -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, _, app):
            inner = app.asgi_app

            async def failing(scope: Any, receive: Any, send: Any) -> None:
                if scope.get("path") == "/boom":
                    raise RuntimeError("boom")
                await inner(scope, receive, send)

            app.asgi_app = failing
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                data = await _read_until_closed(stream)
            assert data.startswith(b"HTTP/1.1 500 ")
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")


async def test_a_client_leaving_mid_body_creates_nothing() -> None:
    with trio.fail_after(CAP):
        async with _server() as (port, registry, _):
            body = json.dumps({"n": 1, "pad": "x" * 1000}).encode()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(_post(body)[:-500])
                await trio.sleep(0.05)
            await trio.sleep(0.05)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            assert not list(registry.list_jobs())


async def test_a_websocket_after_a_keep_alive_request_is_handed_over() -> None:
    """The first request is served by the h11 connection, the handshake after it by
    hypercorn's WebSocket protocol, on the same socket."""
    with trio.fail_after(CAP):
        async with _server() as (port, registry, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(_post(json.dumps({"n": 1}).encode()))
                [(status, _, answer)] = await _responses(stream, 1)
                assert status == 201
                job_id = json.loads(answer)["job_id"]
                await registry.wait(job_id)
                handshake = (
                    f"GET /v1/jobs/{job_id}/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                )
                await stream.send_all(handshake.encode())
                data = b""
                while b"[DONE]" not in data:
                    chunk = await stream.receive_some(65536)
                    assert chunk, data
                    data += chunk
            assert data.startswith(b"HTTP/1.1 101 ")
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in data  # RFC 6455's sample accept key


async def test_a_fixed_size_answer_is_one_write() -> None:
    """Head, body and end of a ``Content-Length`` answer go in one send (one segment on
    loopback), and a stream's head with its first events when they are ready."""
    with trio.fail_after(CAP):
        async with _server() as (port, registry, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(_post(json.dumps({"n": 1}).encode()))
                first = await stream.receive_some(65536)
                head, _, body = first.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 201 ")
                job_id = json.loads(body)["job_id"]
                await registry.wait(job_id)
                await stream.send_all(
                    f"GET /v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                )
                first = await stream.receive_some(65536)
            assert first.startswith(b"HTTP/1.1 200 ") and b"[DONE]" in first


async def test_a_submitted_jobs_stream_head_goes_out_with_its_first_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``POST /v1/jobs`` answered with the job's stream: the job's task starts at once and
    narrates in its first step, so its head waits for that event and they go in one write."""
    writes: list[bytes] = []
    write = Http11Connection.write

    async def recording(self: Http11Connection, data: bytes) -> None:
        writes.append(data)
        await write(self, data)

    monkeypatch.setattr(Http11Connection, "write", recording)
    with trio.fail_after(CAP):
        async with _server() as (port, _, _):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                body = json.dumps({"block": True}).encode()
                await stream.send_all(_post(body, "Accept: text/event-stream"))
                data = b""
                while b'"tick"' not in data:
                    data += await stream.receive_some(65536)
                assert data.startswith(b"HTTP/1.1 200 ")
    assert writes[0].startswith(b"HTTP/1.1 200 ") and b'"action":"tick"' in writes[0]


async def test_keep_alive_max_requests_closes_after_the_last() -> None:
    registry = JobRegistry()
    app = create_app(registry, _executor)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_max_requests = 2
    config.accesslog = None
    stop = trio.Event()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            from hypercorn.utils import wrap_app

            binds: list[str] = await nursery.start(
                lambda task_status: worker_serve(
                    wrap_app(app, config.wsgi_max_body_size, None),
                    config,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            )
            port = int(binds[0].rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                await stream.send_all(get + get)
                data = await _read_until_closed(stream)
            assert data.count(b"HTTP/1.1 200 ") == 2
            assert data.lower().count(b"connection: close") == 1
            stop.set()
