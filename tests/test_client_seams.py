"""The client's seams without a network: the error table, the resume cursor, and a
WebSocket stream driven through a fake connection.

The streams see only a ``StreamConnection``; here it is a fake whose ``open_websocket``
hands out scripted sockets, so reconnects, replays and close codes are tested on
``autojump_clock`` with exact virtual time and no socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import trio_websocket

from trio_jobs import (
    HTTPStatusError,
    JobNotFound,
    NarrationEvent,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
)
from trio_jobs._client._connection import alone
from trio_jobs._client._errors import map_error
from trio_jobs._client._reconnect import ReconnectPolicy, ResumeCursor
from trio_jobs._client._ws_stream import JobWebSocketStream


@pytest.mark.parametrize(
    ("exc", "kind", "reconnectable"),
    [
        (httpx.ConnectTimeout("slow"), TransportError, True),
        (httpx.ReadError("reset"), TransportError, True),
        (httpx.DecodingError("bad gzip"), TransportError, False),
        (httpx.StreamConsumed(), TransportError, False),
        (HTTPStatusError(503, "unavailable"), HTTPStatusError, True),
        (HTTPStatusError(400, "bad request"), HTTPStatusError, False),
        (JobNotFound("j"), JobNotFound, False),
        (trio.TooSlowError(), TransportError, True),
        (ConnectionRefusedError("refused"), TransportError, True),
        (trio_websocket.ConnectionRejected(503, (), b""), HTTPStatusError, True),
        (trio_websocket.ConnectionRejected(404, (), b""), JobNotFound, False),
        (
            trio_websocket.ConnectionClosed(trio_websocket.CloseReason(1001, "bye")),
            TransportError,
            True,
        ),
    ],
)
def test_one_table_maps_every_error(exc: BaseException, kind: type, reconnectable: bool) -> None:
    mapped = map_error(exc, "GET /x", job_id="j")
    assert mapped is not None
    assert type(mapped.error) is kind
    assert mapped.reconnectable is reconnectable
    if isinstance(exc, HTTPStatusError | JobNotFound):
        assert mapped.error is exc  # a trio-jobs error maps to itself


def test_errors_not_ours_are_let_through() -> None:
    assert map_error(ValueError("x"), "GET /x") is None


async def test_cursor_backoff_replays_and_giving_up(autojump_clock: trio.testing.MockClock) -> None:
    cursor = ResumeCursor(ReconnectPolicy(max_reconnects=2, backoff_s=0.5), last_event_id=3)
    cursor.connected()
    assert cursor.replayed(3) and not cursor.replayed(4) and not cursor.replayed(None)
    cursor.delivered("4", 4)
    cause = OSError("gone")
    cursor.failed(cause)
    start = trio.current_time()
    await cursor.wait()
    cursor.failed(cause)
    await cursor.wait(retry_ms=700)  # the server's retry: caps the doubled 1.0 s
    assert trio.current_time() - start == pytest.approx(0.5 + 0.7)
    assert (cursor.reconnects, cursor.last_event_id) == (2, "4")
    cursor.failed(cause)
    error = cursor.given_up("stream of job j")
    assert isinstance(error, StreamEndedWithoutSignal) and error.__cause__ is cause
    assert "last event id 4" in str(error)


class _FakeSocket:
    """Scripted messages, then a close with ``code`` (None: the messages run out silently)."""

    def __init__(self, messages: list[str], code: int | None) -> None:
        self._messages = list(messages)
        self._code = code
        self.sent: list[str] = []

    async def get_message(self) -> str:
        await trio.sleep(0.1)
        if self._messages:
            return self._messages.pop(0)
        if self._code is None:
            await trio.sleep_forever()
        raise trio_websocket.ConnectionClosed(trio_websocket.CloseReason(self._code, None))

    async def send_message(self, message: str) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(message)


class _FakeConnection:
    """A StreamConnection whose WebSockets are :class:`_FakeSocket` scripts, one per open."""

    timeout = 5.0

    def __init__(self, policy: ReconnectPolicy, *scripts: _FakeSocket) -> None:
        self.policy = policy
        self._scripts = list(scripts)
        self.opened: list[tuple[str, dict[str, str]]] = []

    def stream_request(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        raise AssertionError("a WebSocket stream makes no HTTP request")

    async def send(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError("a WebSocket stream makes no HTTP request")

    @asynccontextmanager
    async def open_websocket(self, path: str, headers: Mapping[str, str]) -> AsyncIterator[Any]:
        await trio.lowlevel.checkpoint()
        self.opened.append((path, dict(headers)))
        yield self._scripts.pop(0)


def _event(i: int) -> str:
    return f'{{"id":{i},"job_id":"j","ts":0,"actor":"t","action":"a","human":"h{i}"}}'


async def _follow(connection: _FakeConnection, **kwargs: Any) -> list[object]:
    stream = JobWebSocketStream(connection, "j", **kwargs)
    with alone():
        async with trio.open_nursery() as nursery:
            await nursery.start(stream._run)
            items: list[object] = [item async for item in stream]
            await stream.aclose()
    return items


async def test_websocket_stream_resumes_through_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ReconnectPolicy(max_reconnects=3, backoff_s=0.25)
    connection = _FakeConnection(
        policy,
        _FakeSocket([_event(1), _event(2)], code=1001),  # the server shuts down
        _FakeSocket([_event(2), _event(3), "[DONE]"], code=1000),  # 2 is a replay
    )
    start = trio.current_time()
    items = await _follow(connection, last_event_id=0)
    assert [i.id for i in items if isinstance(i, NarrationEvent)] == [1, 2, 3]
    assert isinstance(items[-1], TerminalSignal)
    assert connection.opened == [
        ("/v1/jobs/j/ws", {"Last-Event-ID": "0"}),
        ("/v1/jobs/j/ws", {"Last-Event-ID": "2"}),
    ]
    # reads 0.1 s apart (two events and a close; three lines and the close that ends the
    # stream), one backoff of 0.25 s between
    assert trio.current_time() - start == pytest.approx(0.3 + 0.25 + 0.4)


async def test_websocket_close_code_no_retry_cures_ends_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection = _FakeConnection(ReconnectPolicy(), _FakeSocket([_event(1)], code=1008))
    with pytest.raises(StreamEndedWithoutSignal, match="close code says a retry would not help"):
        await _follow(connection)
    assert len(connection.opened) == 1


@pytest.mark.parametrize(
    ("method", "path", "headers", "body"),
    [
        ("POST", "/v1/jobs", None, {"operation": "infer", "prompt": "é ☃", "max_tokens": 3}),
        ("GET", "/v1/jobs/job-1/stream", {"Last-Event-ID": "7"}, None),
    ],
)
async def test_a_stream_request_is_the_one_httpx_would_build(
    method: str, path: str, headers: dict[str, str] | None, body: Any
) -> None:
    """The streams' requests skip ``build_request`` (a third of its cost) and come out the
    same: URL, headers, body and timeouts; with cookies set, httpx builds them."""
    from trio_jobs._client._connection import HTTPConnection
    from trio_jobs._client._reconnect import ReconnectPolicy

    auth = {"Authorization": "Bearer t"}
    async with httpx.AsyncClient(base_url="http://127.0.0.1:9", headers=auth) as http:
        conn = HTTPConnection("http://127.0.0.1:9", http, auth, 4.0, ReconnectPolicy(1, 0.1))
        for cookies in (False, True):
            if cookies:
                http.cookies.set("session", "s1")
            ours = conn.stream_request(method, path, headers=headers, json=body)
            want = http.build_request(
                method,
                path,
                json=body,
                headers={
                    "Accept": "text/event-stream",
                    "Cache-Control": "no-cache",
                    **(headers or {}),
                },
                timeout=httpx.Timeout(4.0, read=None),
            )
            assert (ours.method, ours.url) == (want.method, want.url)
            assert sorted(ours.headers.multi_items()) == sorted(want.headers.multi_items())
            assert ours.read() == want.read()
            assert ours.extensions == want.extensions
