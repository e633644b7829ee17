"""JobClient against a real job server: hypercorn on 127.0.0.1 port 0, real sockets.

The server comes from the ``trio_jobs.testing`` fixtures (``trio_jobs_server`` runs the app
in the test's nursery). A small TCP relay between client and server counts connections and
can cut them all at once, which is how a dropped connection is forced. Every test runs
under a ``trio.fail_after`` cap; the only real waits are on sockets.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from trio_jobs import (
    HTTPStatusError,
    InvalidJobState,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobRegistry,
    JobTimeout,
    NarrationEvent,
    Signal,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
    narrate,
)
from trio_jobs._client import JobClient
from trio_jobs.http import create_app, serve
from trio_jobs.testing import (
    assert_stream_cancelled,
    assert_stream_done,
    assert_stream_error,
    narrating_executor,
)

CAP = 10.0  # seconds: a socket test that takes longer is stuck


def _capped(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """The test under ``trio.fail_after(CAP)`` (a fixture's scope cannot cap a test:
    pytest-trio runs each fixture in a task of its own). Applied to every test below."""

    @functools.wraps(test)
    async def capped(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(CAP):
            await test(*args, **kwargs)

    return capped


class Relay:
    """A TCP relay to the server: counts connections, and ``cut()`` drops every one."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.connections = 0
        self.url = ""
        self._scopes: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[str]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(f"http://127.0.0.1:{port}")

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        upstream = await trio.open_tcp_stream(self.host, self.port)
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            async with downstream, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, downstream, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pump, upstream, downstream, nursery.cancel_scope)
        self._scopes.discard(scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        done.cancel()

    def cut(self) -> None:
        for scope in list(self._scopes):
            scope.cancel()


@pytest.fixture
async def relay(nursery: trio.Nursery, trio_jobs_server: str) -> Relay:
    relay = Relay(trio_jobs_server)
    relay.url = await nursery.start(relay.run)
    return relay


def wire(items: list[Any]) -> list[str]:
    return [item.wire for item in items]


# -- submit, stream, records ---------------------------------------------------------------


async def test_submit_stream_get_list(trio_jobs_client: JobClient) -> None:
    client = trio_jobs_client
    job_id = await client.submit({"n": 3}, tags={"team": "a"}, priority="high")
    async with client.stream(job_id) as events:
        items = [item async for item in events]
    assert [i.id for i in items] == [1, 2, 3, 4]
    assert all(isinstance(i, NarrationEvent) and i.job_id == job_id for i in items[:3])
    assert items[0].human == "step 1 of 3"  # type: ignore[union-attr]
    assert items[-1] == TerminalSignal(Signal.DONE, None, 4)
    assert_stream_done(items)
    record = await client.get(job_id)
    assert (record["job_id"], record["state"], record["priority"]) == (job_id, "completed", "high")
    assert record["tags"] == {"team": "a"}
    other = await client.submit({"n": 0})
    await client.wait(other)
    assert [j["job_id"] for j in await client.list_jobs(tag="team:a")] == [job_id]
    completed = {j["job_id"] for j in await client.list_jobs(state="completed")}
    assert completed == {job_id, other}
    assert [h["state"] for h in await client.history(job_id)][-1] == "completed"
    assert (await client.health())["status"] == "ok"


async def test_submit_and_stream_lines(trio_jobs_client: JobClient) -> None:
    lines: list[str] = []
    job_id = await trio_jobs_client.submit_and_stream({"n": 4}, lines.append)
    events = assert_stream_done(lines)
    assert [e["id"] for e in events] == [1, 2, 3, 4]
    assert {e["job_id"] for e in events} == {job_id}
    assert (await trio_jobs_client.get(job_id))["state"] == "completed"


async def test_submit_stream_creates_and_follows_in_one_request(
    trio_jobs_client: JobClient, relay: Relay
) -> None:
    async with trio_jobs_client.submit_stream({"n": 3}, tags={"k": "v"}) as events:
        job_id = events.job_id
        assert job_id is not None
        items = [item async for item in events]
    assert [i.id for i in items] == [1, 2, 3, 4]
    assert {i.job_id for i in items if isinstance(i, NarrationEvent)} == {job_id}
    assert_stream_done(items)
    assert (await trio_jobs_client.get(job_id))["tags"] == {"k": "v"}
    # One connection for both the job and its stream, through a relay that counts them.
    async with JobClient(relay.url) as client:
        async with client.submit_stream({"n": 1}) as events:
            assert_stream_done([item async for item in events])
    assert relay.connections == 1
    with pytest.raises(HTTPStatusError) as refused:
        async with trio_jobs_client.submit_stream({"n": 1}, timeout_s=-1):
            pytest.fail("a refused job opened a stream")
    assert refused.value.status_code == 422


async def test_failure_and_timeout_outcomes(trio_jobs_client: JobClient) -> None:
    lines: list[str] = []
    with pytest.raises(JobFailed, match="disk full") as failed:
        await trio_jobs_client.submit_and_stream({"n": 2, "fail": "disk full"}, lines.append)
    assert type(failed.value) is JobFailed
    assert_stream_error(lines, match="disk full")
    assert (await trio_jobs_client.get(failed.value.job_id or ""))["state"] == "failed"
    with pytest.raises(JobTimeout, match=r"timed out after 0\.05s"):
        await trio_jobs_client.submit_and_stream(
            {"n": 1, "delay": 60}, lambda line: None, timeout_s=0.05
        )


async def test_cancel_ends_the_open_stream(trio_jobs_client: JobClient) -> None:
    client = trio_jobs_client
    job_id = await client.submit({"n": 2, "delay": 60})
    async with client.stream(job_id) as events:
        record = await client.cancel(job_id)
        assert record["job_id"] == job_id
        items = [item async for item in events]
    assert_stream_cancelled(items)
    assert (await client.get(job_id))["state"] == "cancelled"
    with pytest.raises(JobCancelled):
        await client.wait(job_id)
    with pytest.raises(InvalidJobState, match="cancelled"):
        await client.cancel(job_id)


async def test_unknown_job_and_bad_input(trio_jobs_client: JobClient) -> None:
    client = trio_jobs_client
    for call in (client.get, client.cancel, client.wait, client.history):
        with pytest.raises(JobNotFound) as info:
            await call("job-nope")
        assert info.value.job_id == "job-nope"
    with pytest.raises(JobNotFound):
        async with client.stream_ws("job-nope"):
            pytest.fail("opened the websocket of an unknown job")
    with pytest.raises(HTTPStatusError) as bad:
        await client.submit({"n": 1}, priority="urgent")  # type: ignore[arg-type]
    assert bad.value.status_code == 422
    assert "priority" in json.dumps(bad.value.detail)
    with pytest.raises(HTTPStatusError) as bad_one_call:
        await client.submit_and_stream({"n": 1}, print, timeout_s=-1)
    assert bad_one_call.value.status_code == 422
    assert await client.list_jobs() == []  # nothing was created


async def test_resume_from_an_event_id(trio_jobs_client: JobClient) -> None:
    job_id = await trio_jobs_client.submit({"n": 5})
    await trio_jobs_client.wait(job_id)
    async with trio_jobs_client.stream(job_id, last_event_id=3) as events:
        assert [item.id async for item in events] == [4, 5, 6]


# -- connections: reuse, early exit, forced drops ---------------------------------------------


async def test_streams_reuse_one_connection(relay: Relay) -> None:
    """Reading each body to its end keeps the connection: 20 jobs, one TCP connection."""
    async with JobClient(relay.url) as client:
        for _ in range(10):
            await client.submit_and_stream({"n": 3}, lambda line: None)
        for _ in range(10):
            async with client.stream(await client.submit({"n": 2})) as events:
                async for _item in events:
                    pass
    assert relay.connections == 1


async def test_many_concurrent_streams_on_one_client(
    trio_jobs_client: JobClient, gates: dict[str, trio.Event]
) -> None:
    """More open streams than httpx's default pool cap (100): none waits for a slot."""
    gate = gates.setdefault("many", trio.Event())
    done: list[str] = []

    async def follow(job_id: str) -> None:
        await trio_jobs_client.wait(job_id)
        done.append(job_id)

    async with trio.open_nursery() as nursery:
        for _ in range(120):
            job_id = await trio_jobs_client.submit({"gate": "many", "before": 1, "after": 1})
            nursery.start_soon(follow, job_id)
        while (await trio_jobs_client.health())["open_streams"] < 120:
            await trio.sleep(0.01)
        gate.set()
    assert len(done) == 120


async def test_leaving_a_stream_early_disconnects(
    trio_jobs_client: JobClient, trio_jobs_registry: JobRegistry
) -> None:
    """The server sees the client go: with ``on_disconnect="cancel"`` the job is cancelled."""
    client = trio_jobs_client
    job_id = await client.submit({"n": 3, "delay": 60}, on_disconnect="cancel")
    detached = await client.submit({"n": 2, "delay": 0.05})
    for each in (job_id, detached):
        async with client.stream(each):
            pass
    record = await trio_jobs_registry.wait(job_id)
    assert record.state.value == "cancelled"
    assert (await trio_jobs_registry.wait(detached)).state.value == "completed"


@pytest.fixture
def gates() -> dict[str, trio.Event]:
    return {}


@pytest.fixture
def trio_jobs_executor(gates: dict[str, trio.Event]) -> Callable[[str, Any], Any]:
    """Narrate ``before`` events, wait for the test's gate, then narrate ``after`` more."""

    async def executor(job_id: str, payload: Any) -> None:
        if "gate" not in payload:
            await narrating_executor(job_id, payload)
            return
        for i in range(payload["before"]):
            narrate("before", f"before {i}")
        await gates.setdefault(payload["gate"], trio.Event()).wait()
        for i in range(payload["after"]):
            narrate("after", f"after {i}")

    return executor


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_reconnect_after_forced_disconnect(
    relay: Relay, gates: dict[str, trio.Event], transport: str
) -> None:
    """Cut mid-stream: the stream resumes with Last-Event-ID, no gap and no duplicate."""
    gate = gates.setdefault(transport, trio.Event())
    async with JobClient(relay.url, backoff_s=0.01) as client:
        job_id = await client.submit({"gate": transport, "before": 5, "after": 5})
        stream = client.stream(job_id) if transport == "sse" else client.stream_ws(job_id)
        async with stream as events:
            items = [await events.receive() for _ in range(5)]
            relay.cut()
            gate.set()
            items += [item async for item in events]
            events.check()
    assert (events.reconnects, events.last_event_id) == (1, "11" if transport == "sse" else "10")
    assert [i.id for i in items[:-1]] == list(range(1, 11))
    assert_stream_done(items)
    # An SSE stream reuses the submit's connection; a WebSocket has one of its own.
    assert relay.connections == (2 if transport == "sse" else 3)


async def test_one_call_form_resumes_too(relay: Relay, gates: dict[str, trio.Event]) -> None:
    gate = gates.setdefault("h", trio.Event())
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if len(lines) == 3:
            relay.cut()
            gate.set()

    async with JobClient(relay.url, backoff_s=0.01) as client:
        job_id = await client.submit_and_stream({"gate": "h", "before": 3, "after": 3}, on_line)
    events = assert_stream_done(lines)
    assert [e["id"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e["job_id"] for e in events} == {job_id}


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_server_gone_exhausts_reconnects(
    trio_jobs_executor: Callable[[str, Any], Any], transport: str
) -> None:
    """The server stops mid-stream (a WebSocket is closed with 1001); reconnects are
    refused; the stream says so, and keeps saying it."""
    app = create_app(JobRegistry(), trio_jobs_executor)
    server = trio.CancelScope()

    async def run_server(*, task_status: trio.TaskStatus[str]) -> None:
        with server:
            await serve(app, grace_s=0.0, task_status=task_status)

    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_server)
        async with JobClient(url, max_reconnects=2, backoff_s=0.01) as client:
            job_id = await client.submit({"gate": "never", "before": 1, "after": 0})
            stream = client.stream(job_id) if transport == "sse" else client.stream_ws(job_id)
            async with stream as events:
                assert isinstance(await events.receive(), NarrationEvent)
                server.cancel()
                with pytest.raises(StreamEndedWithoutSignal, match="2 reconnect") as info:
                    await events.receive()
                with pytest.raises(StreamEndedWithoutSignal):
                    await events.receive()
        assert events.reconnects == 2
        # refused, or accepted by a listener on its way out and closed unanswered
        assert isinstance(info.value.__cause__, httpx.TransportError | OSError)
    assert server.cancelled_caught
    if transport == "ws":
        assert events.close_code == 1001


# -- WebSocket and auth -----------------------------------------------------------------------


async def test_websocket_stream(trio_jobs_client: JobClient) -> None:
    job_id = await trio_jobs_client.submit({"n": 3})
    async with trio_jobs_client.stream_ws(job_id) as ws:
        items = [item async for item in ws]
        ws.check()
    assert [i.id for i in items[:3]] == [1, 2, 3]
    assert_stream_done(items)
    assert ws.close_code == 1000


async def test_websocket_batches_and_late_cancel(trio_jobs_client: JobClient) -> None:
    job_id = await trio_jobs_client.submit({"n": 50})
    await trio_jobs_client.wait(job_id)
    items: list[Any] = []
    async with trio_jobs_client.stream_ws(job_id) as ws:
        while True:
            await ws.wait_ready()
            batch = ws.receive_batch()
            if not batch:
                break
            items += batch
        await ws.send_cancel()  # the connection is closed: a no-op
    assert [i.id for i in items[:50]] == list(range(1, 51))
    assert_stream_done(items)


async def test_websocket_resumes_from_an_event_id(trio_jobs_client: JobClient) -> None:
    job_id = await trio_jobs_client.submit({"n": 5})
    await trio_jobs_client.wait(job_id)
    async with trio_jobs_client.stream_ws(job_id, last_event_id=3) as ws:
        items = [item async for item in ws]
    assert [i.id for i in items[:-1]] == [4, 5]
    assert_stream_done(items)


async def test_keepalive_comments_are_skipped() -> None:
    """A quiet job: the server sends ``: keep-alive`` comments; the client sees only items."""
    app = create_app(JobRegistry(), narrating_executor, keepalive_s=0.02)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, app)
        async with JobClient(url) as client, httpx.AsyncClient(base_url=url) as raw:
            quiet = {"n": 2, "delay": 0.1}
            job_id = await client.submit(quiet)
            async with raw.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
            assert b"\n: keep-alive\n" in body or body.startswith(b": keep-alive")
            lines: list[str] = []
            await client.submit_and_stream(quiet, lines.append)
            assert len(assert_stream_done(lines)) == 2
        nursery.cancel_scope.cancel()


async def test_websocket_cancel(trio_jobs_client: JobClient) -> None:
    job_id = await trio_jobs_client.submit({"n": 3, "delay": 60})
    async with trio_jobs_client.stream_ws(job_id) as ws:
        await ws.send_cancel()
        lines = [line async for line in ws.lines()]
        with pytest.raises(JobCancelled):
            ws.check()
    assert_stream_cancelled(lines)
    assert ws.close_code == 1000
    assert (await trio_jobs_client.get(job_id))["state"] == "cancelled"


async def test_websocket_errors_in_the_block_come_out_alone(
    trio_jobs_client: JobClient, trio_jobs_registry: JobRegistry
) -> None:
    """An error raised in the block is not wrapped in a group; the socket is closed."""
    job_id = await trio_jobs_client.submit({"n": 2, "delay": 60}, on_disconnect="cancel")
    with pytest.raises(ValueError, match="mine"):
        async with trio_jobs_client.stream_ws(job_id):
            raise ValueError("mine")
    # The server saw the WebSocket go: the job's cancel-on-disconnect policy applied.
    assert (await trio_jobs_registry.wait(job_id)).state.value == "cancelled"


async def test_websocket_cancel_during_a_drop_reaches_the_server(
    relay: Relay, trio_jobs_registry: JobRegistry
) -> None:
    """A cancel sent while the connection is gone is sent again on the next one."""
    async with JobClient(relay.url, backoff_s=0.01) as client:
        job_id = await client.submit({"gate": "never", "before": 1, "after": 0})
        async with client.stream_ws(job_id) as ws:
            first = await ws.receive()
            relay.cut()
            await ws.send_cancel()
            lines = [line async for line in ws.lines()]
            with pytest.raises(JobCancelled):
                ws.check()
    assert isinstance(first, NarrationEvent) and first.id == 1
    assert lines == ["[CANCELLED]"]
    assert ws.reconnects == 1
    assert (await trio_jobs_registry.wait(job_id)).state.value == "cancelled"


async def test_websocket_resumed_on_a_server_without_the_job_is_not_found(
    relay: Relay, nursery: trio.Nursery
) -> None:
    """The relay's next connection goes to another server that never had the job: the
    reader gets the lines it had, then JobNotFound (a 404 is not retried)."""
    other = await nursery.start(serve, create_app(JobRegistry(), narrating_executor))
    async with JobClient(relay.url, backoff_s=0.01, max_reconnects=5) as client:
        job_id = await client.submit({"gate": "never", "before": 1, "after": 0})
        async with client.stream_ws(job_id) as ws:
            assert isinstance(await ws.receive(), NarrationEvent)
            relay.port = int(other.rsplit(":", 1)[1])
            relay.cut()
            with pytest.raises(JobNotFound):
                await ws.receive()
    assert ws.reconnects == 1


async def test_websocket_cancelled_from_outside_closes_at_once(
    trio_jobs_client: JobClient, trio_jobs_registry: JobRegistry
) -> None:
    """A scope around the block is cancelled: the socket closes without waiting for a
    close handshake, and the server sees the client go (cancel-on-disconnect applies)."""
    job_id = await trio_jobs_client.submit(
        {"gate": "never", "before": 1, "after": 0}, on_disconnect="cancel"
    )
    with trio.fail_after(1.0):  # a close handshake with no reader would wait 10 s
        with trio.CancelScope() as scope:
            async with trio_jobs_client.stream_ws(job_id) as ws:
                await ws.receive()
                scope.cancel()
                await trio.sleep_forever()
        assert (await trio_jobs_registry.wait(job_id)).state.value == "cancelled"


class ScriptedWebSocketPeer:
    """A misbehaving WebSocket server (trio-websocket on 127.0.0.1 port 0) for what ours
    never does: each connection accepts, sends ``lines``, then closes with ``code``."""

    def __init__(self, lines: list[str], code: int) -> None:
        self.lines, self.code = lines, code
        self.connections = 0

    async def _handle(self, request: Any) -> None:
        self.connections += 1
        ws = await request.accept()
        for line in self.lines:
            await ws.send_message(line)
        await ws.aclose(self.code)

    async def run(self, *, task_status: trio.TaskStatus[str]) -> None:
        from trio_websocket import serve_websocket

        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_websocket, self._handle, "127.0.0.1", 0, ssl_context=None)
            )
            task_status.started(f"http://127.0.0.1:{server.port}")


EVENT = '{"id":1,"job_id":"j","ts":"2026-01-01T00:00:00Z","actor":"a","action":"x","human":"h"}'


async def test_websocket_data_after_the_signal_is_an_error(nursery: trio.Nursery) -> None:
    peer = ScriptedWebSocketPeer([EVENT, "[DONE]", EVENT.replace('"id":1', '"id":2')], 1000)
    url = await nursery.start(peer.run)
    async with JobClient(url, backoff_s=0.01) as client, client.stream_ws("j") as ws:
        assert isinstance(await ws.receive(), NarrationEvent)
        assert await ws.receive() == TerminalSignal(Signal.DONE)
        with pytest.raises(TransportError, match="data after the signal"):
            await ws.receive()


async def test_websocket_policy_close_is_not_retried(nursery: trio.Nursery) -> None:
    peer = ScriptedWebSocketPeer([EVENT], 1008)
    url = await nursery.start(peer.run)
    async with JobClient(url, backoff_s=0.01) as client, client.stream_ws("j") as ws:
        assert isinstance(await ws.receive(), NarrationEvent)
        with pytest.raises(StreamEndedWithoutSignal, match="1008"):
            await ws.receive()
    assert (ws.close_code, ws.reconnects, peer.connections) == (1008, 0, 1)


@pytest.mark.parametrize("trio_jobs_token", ["s3cret"])
async def test_token_auth(trio_jobs_server: str, trio_jobs_client: JobClient) -> None:
    job_id = await trio_jobs_client.submit({"n": 1})  # the fixture client has the token
    await trio_jobs_client.wait(job_id)
    async with trio_jobs_client.stream_ws(job_id) as ws:
        assert_stream_done([item async for item in ws])
    for token in (None, "wrong"):
        async with JobClient(trio_jobs_server, token=token) as client:
            assert (await client.health())["status"] == "ok"
            for call in (
                lambda: client.submit({"n": 1}),
                lambda: client.get(job_id),
                lambda: client.wait(job_id),
            ):
                with pytest.raises(HTTPStatusError) as info:
                    await call()
                assert info.value.status_code == 401
            with pytest.raises(HTTPStatusError) as ws_info:
                async with client.stream_ws(job_id):
                    pytest.fail("websocket opened without the token")
            assert ws_info.value.status_code == 401


for _name, _test in list(globals().items()):
    if _name.startswith("test_") and inspect.iscoroutinefunction(_test):
        globals()[_name] = _capped(_test)
