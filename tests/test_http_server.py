"""The job HTTP layer through real sockets: hypercorn on 127.0.0.1 port 0, httpx and
trio-websocket clients.

Every test runs under a ``trio.fail_after`` cap; waits on real sockets are bounded polls.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import httpx
import pytest
import trio
import trio_websocket
from pydantic import BaseModel, TypeAdapter

from trio_jobs import JobRegistry, JobState, narrate
from trio_jobs.http import JobService, create_app, job_service, jobs_blueprint, serve

CAP = 10.0


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect after each test, so an unclosed socket is reported by the test that leaked it."""
    yield
    gc.collect()


# ---- an executor the tests can steer -----------------------------------------------------


@dataclass
class Gates:
    """Per-job events an executor waits on (payload ``{"gate": true}``)."""

    events: dict[str, trio.Event] = field(default_factory=dict)

    def get(self, job_id: str) -> trio.Event:
        return self.events.setdefault(job_id, trio.Event())

    def open(self, job_id: str) -> None:
        self.get(job_id).set()


def make_executor(gates: Gates) -> Callable[[str, Any], Awaitable[None]]:
    """Payload: ``n`` events (``delay`` s apart), then optionally wait for the job's gate,
    block forever, or fail with a message."""

    async def executor(job_id: str, payload: Any) -> None:
        n = int(payload.get("n", 3))
        delay = float(payload.get("delay", 0.0))
        for i in range(n):
            narrate("tick", f"tick {i}", seq=i)
            if delay:
                await trio.sleep(delay)
        if payload.get("gate"):
            await gates.get(job_id).wait()
            narrate("gate", "gate opened")
        if payload.get("block"):
            await trio.sleep_forever()
        if "fail" in payload:
            raise RuntimeError(payload["fail"])

    return executor


@dataclass
class Server:
    url: str
    registry: JobRegistry
    app: Any
    service: JobService
    gates: Gates

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:]


async def start_server(nursery: trio.Nursery, **options: Any) -> Server:
    registry = JobRegistry()
    gates = Gates()
    options.setdefault("keepalive_s", 15.0)
    grace_s = options.pop("grace_s", 0.5)
    app = create_app(registry, make_executor(gates), **options)
    url = await nursery.start(
        lambda task_status: serve(app, grace_s=grace_s, task_status=task_status)
    )
    service = job_service(app)
    assert service is not None
    return Server(url, registry, app, service, gates)


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    return await start_server(nursery)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(5, read=None)) as c:
        yield c


# ---- SSE helpers -------------------------------------------------------------------------


@dataclass
class Frame:
    id: str | None
    data: str | None
    comments: list[str]


def parse_frames(text: str) -> list[Frame]:
    """Split an SSE body into frames (a frame ends at a blank line)."""
    frames = []
    for block in text.split("\n\n"):
        if not block:
            continue
        ident = None
        data: list[str] = []
        comments = []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif line.startswith("retry: "):
                comments.append(line)
        frames.append(Frame(ident, "\n".join(data) if data else None, comments))
    return frames


def data_frames(text: str) -> list[Frame]:
    return [f for f in parse_frames(text) if f.data is not None]


class RawStream:
    """A minimal HTTP/1.1 client (trio socket + h11) for reading part of a stream.

    httpx's nested async generators cannot be left half-read without ResourceWarnings;
    this client can: leaving the block closes the socket (the client vanishes).
    """

    def __init__(
        self,
        url: str,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        wait_for_answer: bool = True,
    ) -> None:
        self._host, port = url.removeprefix("http://").split(":")
        self._port = int(port)
        self._request = (method, path, headers or {}, body)
        self._wait_for_answer = wait_for_answer
        self._conn = h11.Connection(h11.CLIENT)
        self._sock: trio.SocketStream | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.ended = False

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()

    async def __aenter__(self) -> RawStream:
        self._sock = await trio.open_tcp_stream(self._host, self._port)
        method, path, headers, body = self._request
        all_headers = [("Host", self._host)] if "Host" not in headers else []
        all_headers += headers.items()
        if body:
            all_headers.append(("Content-Length", str(len(body))))
        data = self._conn.send(h11.Request(method=method, target=path, headers=all_headers))
        data += self._conn.send(h11.Data(data=body)) if body else b""
        data += self._conn.send(h11.EndOfMessage())
        await self._sock.send_all(data)
        if not self._wait_for_answer:
            return self
        event = await self._next()
        assert isinstance(event, h11.Response), event
        self.status = event.status_code
        self.headers = {k.decode(): v.decode() for k, v in event.headers}
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._sock is not None
        await self._sock.aclose()

    async def _next(self) -> Any:
        assert self._sock is not None
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                self._conn.receive_data(await self._sock.receive_some(65536))
                continue
            return event

    async def _step(self) -> None:
        event = await self._next()
        if isinstance(event, h11.Data):
            self.chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            self.ended = True
        else:
            raise AssertionError(event)

    async def until(self, marker: str) -> str:
        """Read until ``marker`` appears in the body text; return the text so far."""
        while marker not in self.text:
            assert not self.ended, f"body ended before {marker!r}: {self.text!r}"
            await self._step()
        return self.text

    async def rest(self) -> str:
        """Read to the end of the body (a cut chunk raises); return the whole text."""
        while not self.ended:
            await self._step()
        return self.text


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll ``check`` on the real clock (state changed by another connection's task)."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


@asynccontextmanager
async def open_ws(url: str, **options: Any) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """``open_websocket_url`` that also closes the socket when the server closed first
    (trio-websocket 0.12 leaves it open then, and the GC reports a ResourceWarning)."""
    async with trio_websocket.open_websocket_url(url, **options) as ws:
        try:
            yield ws
        finally:
            await ws._stream.aclose()


async def ws_handshake_rejection(
    url: str, path: str, extra: dict[str, str] | None = None
) -> tuple[int, Any]:
    """Send a WebSocket upgrade request that the server should refuse with an HTTP error.

    (trio-websocket's client leaks its socket on a rejected handshake, so the upgrade is
    sent by hand.)
    """
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **(extra or {}),
    }
    async with RawStream(url, path, headers=headers) as raw:
        body = await raw.rest()
    return raw.status, json.loads(body)


async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    return job_id


# ---- records, list, history, cancel ------------------------------------------------------


async def test_submit_answers_201_with_urls(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        response = await client.post(
            "/v1/jobs",
            json={"n": 1, "timeout_s": 5, "priority": "high", "tags": {"team": "a"}, "x": [1]},
        )
        assert response.status_code == 201
        body = response.json()
        job_id = body["job_id"]
        assert body == {
            "job_id": job_id,
            "sse_url": f"/v1/jobs/{job_id}/stream",
            "ws_url": f"/v1/jobs/{job_id}/ws",
        }
        assert response.headers["Location"] == f"/v1/jobs/{job_id}"
        await server.registry.wait(job_id)
        record = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert record["state"] == "completed"
        assert record["payload"] == {"n": 1, "x": [1]}  # options removed from the payload
        assert record["timeout_s"] == 5.0
        assert record["priority"] == "high"
        assert record["tags"] == {"team": "a"}


async def test_get_list_history_and_cancel(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        done = await submit(client, {"n": 1, "tags": {"k": "done"}})
        held = await submit(client, {"n": 1, "block": True, "tags": {"k": "held"}})
        await server.registry.wait(done)
        await eventually(lambda: server.registry.get(held).state is JobState.RUNNING)

        assert (await client.get(f"/v1/jobs/{done}")).json()["state"] == "completed"
        listed = (await client.get("/v1/jobs")).json()["jobs"]
        assert [j["job_id"] for j in listed] == [done, held]
        running = (await client.get("/v1/jobs", params={"state": "running"})).json()["jobs"]
        assert [j["job_id"] for j in running] == [held]
        tagged = (await client.get("/v1/jobs", params={"tag": "k:done"})).json()["jobs"]
        assert [j["job_id"] for j in tagged] == [done]

        cancelled = await client.delete(f"/v1/jobs/{held}")
        assert cancelled.status_code == 200
        assert cancelled.json()["job_id"] == held
        await server.registry.wait(held)
        assert (await client.get(f"/v1/jobs/{held}")).json()["state"] == "cancelled"

        again = await client.delete(f"/v1/jobs/{held}")
        assert again.status_code == 409
        assert again.json()["error"] == "conflict"
        finished = await client.delete(f"/v1/jobs/{done}")
        assert finished.status_code == 409
        assert "completed" in finished.json()["detail"]

        history = (await client.get(f"/v1/jobs/{held}/history")).json()
        assert [h["state"] for h in history["history"]] == ["queued", "running", "cancelled"]
        assert all(h["at"].endswith("Z") for h in history["history"])


async def test_unknown_job_is_404_everywhere(client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        for method, path in [
            ("GET", "/v1/jobs/nope"),
            ("DELETE", "/v1/jobs/nope"),
            ("GET", "/v1/jobs/nope/history"),
            ("GET", "/v1/jobs/nope/stream"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 404, (method, path)
            assert response.json() == {"error": "not found", "detail": "unknown job: nope"}


async def test_bad_list_filters_are_422(client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        bad_state = await client.get("/v1/jobs", params={"state": "sleeping"})
        assert bad_state.status_code == 422
        assert bad_state.json()["detail"][0]["loc"] == ["state"]
        bad_tag = await client.get("/v1/jobs", params={"tag": "novalue"})
        assert bad_tag.status_code == 422
        assert bad_tag.json()["detail"][0]["loc"] == ["tag"]
        for name in ("state", "tag"):  # present but empty is not "no filter"
            empty = await client.get(f"/v1/jobs?{name}=")
            assert empty.status_code == 422
            assert empty.json()["detail"][0]["loc"] == [name]


async def test_both_resume_points_are_validated(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 3})
        await server.registry.wait(job_id)
        path = f"/v1/jobs/{job_id}/stream"
        bad_query = await client.get(
            f"{path}?last_event_id=1{'0' * 18}", headers={"Last-Event-ID": "1"}
        )
        assert bad_query.status_code == 422
        assert bad_query.json()["detail"][0]["loc"] == ["last_event_id"]
        header_wins = await client.get(f"{path}?last_event_id=0", headers={"Last-Event-ID": "2"})
        assert [f.id for f in data_frames(header_wins.text)] == ["3", "4"]
        empty_header = await client.get(path, headers={"Last-Event-ID": ""})
        assert len(data_frames(empty_header.text)) == 4


async def test_websocket_route_over_plain_http_is_426(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        response = await client.get("/v1/jobs/anything/ws")
        assert response.status_code == 426
        assert response.headers["Upgrade"] == "websocket"
        body = response.json()
        assert body["error"] == "upgrade required"
        assert "/v1/jobs/anything/stream" in body["detail"]


async def test_integral_floats_are_integers(server: Server, client: httpx.AsyncClient) -> None:
    """JSON Schema counts 2.0 as an integer; 2.5 and "2" are not."""
    with trio.fail_after(CAP):
        ok = await client.post("/v1/jobs", json={"n": 1, "retry": {"max_attempts": 2.0}})
        assert ok.status_code == 201
        record = server.registry.get(ok.json()["job_id"]).to_dict()
        assert record["retry"]["max_attempts"] == 2
        for bad in (2.5, "2", True):
            response = await client.post("/v1/jobs", json={"n": 1, "retry": {"max_attempts": bad}})
            assert response.status_code == 422
            assert response.json()["detail"][0]["loc"] == ["retry", "max_attempts"]


async def test_quart_404_and_405_are_json(client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        missing = await client.get("/no/such/route")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/json"
        assert missing.json()["error"] == "not found"
        wrong = await client.put("/v1/jobs", json={})
        assert wrong.status_code == 405
        assert wrong.json()["error"] == "method not allowed"
        assert "POST" in wrong.headers["Allow"]


# ---- bad input changes nothing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "loc"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b'{"n": NaN}', 400, None),
        (b'{"s": "\\ud800"}', 400, None),
        (b"\xff\xfe\x00", 400, None),
        (b"[1, 2]", 422, []),
        (b'"text"', 422, []),
        (b'{"timeout_s": -1}', 422, ["timeout_s"]),
        (b'{"timeout_s": "5"}', 422, ["timeout_s"]),
        (b'{"timeout_s": true}', 422, ["timeout_s"]),
        (b'{"priority": "urgent"}', 422, ["priority"]),
        (b'{"tags": {"a": 1}}', 422, ["tags", "a"]),
        (b'{"retry": {"max_attempts": 0}}', 422, ["retry", "max_attempts"]),
        (b'{"retry": {"bogus": 1}}', 422, ["retry", "bogus"]),
        (b'{"on_disconnect": "explode"}', 422, ["on_disconnect"]),
        (b'{"expires_s": 0}', 422, ["expires_s"]),
    ],
)
async def test_bad_bodies_get_json_errors_and_create_nothing(
    server: Server, client: httpx.AsyncClient, body: bytes, status: int, loc: list[str] | None
) -> None:
    with trio.fail_after(CAP):
        response = await client.post(
            "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == status, response.text
        error = response.json()
        assert set(error) == {"error", "detail"}
        if loc is not None:
            assert error["detail"][0]["loc"] == loc
        assert len(server.registry) == 0
        # The connection stays usable after an error.
        assert (await client.get("/health")).status_code == 200


async def test_body_over_the_limit_is_413(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery, max_body_bytes=1000)
        async with httpx.AsyncClient(base_url=srv.url) as c:
            big = {"n": 1, "pad": "x" * 2000}
            response = await c.post("/v1/jobs", json=big)
            assert response.status_code == 413
            assert response.json()["error"] == "request body too large"
            # A chunked upload (no Content-Length) is cut off too.

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"pad": "'
                for _ in range(10):
                    yield b"x" * 200
                yield b'"}'

            response = await c.post(
                "/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 413
            assert len(srv.registry) == 0
            ok = await c.post("/v1/jobs", json={"n": 1})
            assert ok.status_code == 201


class Echo(BaseModel):
    operation: str
    text: str


async def test_parse_payload_errors_name_the_field(nursery: trio.Nursery) -> None:
    adapter = TypeAdapter(Echo)

    def parse(body: dict[str, Any]) -> Any:
        if body.get("operation") == "forbidden":
            raise ValueError("operation forbidden here")
        return adapter.validate_python(body).model_dump()

    with trio.fail_after(CAP):
        srv = await start_server(nursery, parse_payload=parse)
        async with httpx.AsyncClient(base_url=srv.url) as c:
            missing = await c.post("/v1/jobs", json={"operation": "echo", "timeout_s": 1})
            assert missing.status_code == 422
            assert missing.json()["detail"][0]["loc"] == ["text"]
            forbidden = await c.post("/v1/jobs", json={"operation": "forbidden", "text": "x"})
            assert forbidden.status_code == 422
            assert "forbidden" in forbidden.json()["detail"][0]["msg"]
            assert len(srv.registry) == 0
            ok = await c.post("/v1/jobs", json={"operation": "echo", "text": "hi", "n": 0})
            assert ok.status_code == 201
            record = srv.registry.get(ok.json()["job_id"])
            assert record.payload == {"operation": "echo", "text": "hi"}


# ---- SSE -------------------------------------------------------------------------------------


async def test_sse_stream_format(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 3})
        await server.registry.wait(job_id)
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            body = (await response.aread()).decode()
        events = server.registry.events(job_id)
        expected = "retry: 2000\n" + "".join(f"id: {e.id}\ndata: {e.wire}\n\n" for e in events)
        assert body == expected + "id: 4\ndata: [DONE]\n\n"


async def test_sse_error_signal_with_newlines_keeps_framing(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 1, "fail": "boom\nsecond line"})
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            body = (await response.aread()).decode()
        frames = data_frames(body)
        assert frames[-1].id == "2"
        assert frames[-1].data == "[ERROR] boom\nsecond line"
        assert body.endswith("id: 2\ndata: [ERROR] boom\ndata: second line\n\n")


async def test_ready_events_are_written_as_one_chunk(server: Server) -> None:
    """A finished job's 50 events and its signal go out as a single HTTP chunk."""
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 50})
        await server.registry.wait(job_id)
        host, port = server.url.removeprefix("http://").split(":")
        sock = await trio.open_tcp_stream(host, int(port))
        async with sock:
            await sock.send_all(
                f"GET /v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
            )
            raw = b""
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                data = await sock.receive_some(65536)
                assert data, raw
                raw += data
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        chunks = []
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            body = rest[size + 2 :]
        assert len(chunks) == 1
        text = chunks[0].decode()
        assert text.startswith("retry: 2000\nid: 1\n")
        assert text.endswith("id: 51\ndata: [DONE]\n\n")
        assert len(data_frames(text)) == 51


async def test_two_subscribers_see_the_same_stream(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 5, "delay": 0.01, "gate": True})
        bodies: list[str] = []

        async def follow() -> None:
            async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                bodies.append((await response.aread()).decode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            nursery.start_soon(follow)
            await eventually(lambda: server.service.watchers(job_id) == 2)
            server.gates.open(job_id)
        first, second = (data_frames(b) for b in bodies)
        assert [f.id for f in first] == [str(i) for i in range(1, 8)]
        assert [(f.id, f.data) for f in first] == [(f.id, f.data) for f in second]
        assert first[-1].data == "[DONE]"


async def test_resume_after_forced_disconnect_has_no_gap_and_no_duplicate(
    server: Server,
) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 6, "gate": True})
        await eventually(lambda: len(server.registry.events(job_id)) == 6)
        async with RawStream(server.url, f"/v1/jobs/{job_id}/stream") as raw:
            text = await raw.until("id: 4\n")
        # That client and its connection are gone mid-stream; the job goes on.
        seen = data_frames(text.rsplit("\n\n", 1)[0] + "\n\n")
        assert 3 <= len(seen) <= 6
        last = seen[-1].id
        async with httpx.AsyncClient(base_url=server.url) as c:
            resumed_by = [{"Last-Event-ID": last}, {}]
            params = [{}, {"last_event_id": last}]
            results = []
            for headers, query in zip(resumed_by, params, strict=True):
                async with c.stream(
                    "GET", f"/v1/jobs/{job_id}/stream", headers=headers, params=query
                ) as response:
                    if not results:
                        server.gates.open(job_id)
                    results.append(data_frames((await response.aread()).decode()))
        for rest in results:
            ids = [int(f.id or 0) for f in seen + rest]
            assert ids == list(range(1, 9))
            assert rest[-1].data == "[DONE]"


async def test_bad_last_event_id_is_422(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 1})
        response = await client.get(f"/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": "abc"})
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["Last-Event-ID"]


async def test_one_call_post_streams_the_new_job(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        async with client.stream(
            "POST", "/v1/jobs", json={"n": 2}, headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            job_id = response.headers["X-Job-Id"]
            body = (await response.aread()).decode()
        assert job_id in server.registry
        assert [f.data for f in data_frames(body)][-1] == "[DONE]"
        assert [f.id for f in data_frames(body)] == ["1", "2", "3"]


async def test_keepalive_comment_while_idle(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery, keepalive_s=0.05)
        async with httpx.AsyncClient(base_url=srv.url, timeout=httpx.Timeout(5, read=None)) as c:
            job_id = await submit(c, {"n": 1, "gate": True})
            async with RawStream(srv.url, f"/v1/jobs/{job_id}/stream") as raw:
                await raw.until(": keep-alive\n: keep-alive\n")
                srv.gates.open(job_id)
                text = await raw.rest()
        assert text.startswith("retry: 2000\nid: 1\n")
        # Lone comment lines: no data-less block ends with a blank line.
        assert "\n\n: keep-alive\n: keep-alive\n" in text
        assert ": keep-alive\n\n" not in text
        assert [f.data for f in data_frames(text)][-1] == "[DONE]"


async def test_quart_response_timeout_does_not_cut_streams(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery)
        srv.app.config["RESPONSE_TIMEOUT"] = 0.1
        async with httpx.AsyncClient(base_url=srv.url, timeout=httpx.Timeout(5, read=None)) as c:
            job_id = await submit(c, {"n": 3, "delay": 0.1})
            async with c.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                body = (await response.aread()).decode()
        assert [f.data for f in data_frames(body)][-1] == "[DONE]"


async def test_vanished_client_leaks_no_task_and_detached_job_completes(
    server: Server,
) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 2, "gate": True})
        await eventually(lambda: len(server.registry.events(job_id)) == 2)
        await eventually(lambda: server.service.watchers(job_id) == 0)
        await trio.sleep(0.05)  # let the closed connection's tasks finish
        baseline = count_tasks()
        async with RawStream(server.url, f"/v1/jobs/{job_id}/stream") as raw:
            await raw.until("id: 2\n")
            assert server.service.watchers(job_id) == 1
            assert count_tasks() > baseline
        await eventually(lambda: server.service.watchers(job_id) == 0)
        await eventually(lambda: count_tasks() == baseline)
        assert server.registry.get(job_id).state is JobState.RUNNING
        server.gates.open(job_id)
        record = await server.registry.wait(job_id)
        assert record.state is JobState.COMPLETED
        metrics = (await _get(server, "/metrics")).text
        assert 'trio_jobs_open_streams{transport="sse"} 0.0' in metrics


async def _get(server: Server, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url) as c:
        return await c.get(path)


async def test_cancel_policy_cancels_when_the_last_client_leaves(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 1, "block": True, "on_disconnect": "cancel"})
        path = f"/v1/jobs/{job_id}/stream"
        async with RawStream(server.url, path) as first:
            await first.until("id: 1\n")
            async with RawStream(server.url, path) as second:
                await second.until("id: 1\n")
                assert server.service.watchers(job_id) == 2
            # One client left: the job goes on while another still watches.
            await eventually(lambda: server.service.watchers(job_id) == 1)
            assert server.registry.get(job_id).state is JobState.RUNNING
        record = await server.registry.wait(job_id)
        assert record.state is JobState.CANCELLED


async def test_detach_policy_is_the_default_for_one_call_post(server: Server) -> None:
    with trio.fail_after(CAP):
        async with RawStream(
            server.url,
            "/v1/jobs",
            method="POST",
            headers={"Accept": "text/event-stream", "Content-Type": "application/json"},
            body=json.dumps({"n": 1, "gate": True}).encode(),
        ) as raw:
            assert raw.status == 200
            job_id = raw.headers["x-job-id"]
            await raw.until("id: 1\n")
        await eventually(lambda: server.service.watchers(job_id) == 0)
        server.gates.open(job_id)
        assert (await server.registry.wait(job_id)).state is JobState.COMPLETED


# ---- WebSocket ---------------------------------------------------------------------------


async def test_websocket_streams_lines_and_closes_1000(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 3, "delay": 0.01})
        lines: list[str] = []

        async def receive_all(ws: trio_websocket.WebSocketConnection) -> None:
            while True:
                lines.append(str(await ws.get_message()))

        async with open_ws(f"{server.ws_url}/v1/jobs/{job_id}/ws") as ws:
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await receive_all(ws)
        assert closed.value.reason.code == 1000
        assert lines[-1] == "[DONE]"
        assert [json.loads(line)["id"] for line in lines[:-1]] == [1, 2, 3]
        assert lines[:-1] == [e.wire for e in server.registry.events(job_id)]


async def test_websocket_cancel_and_bad_messages(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 1, "block": True})
        async with open_ws(f"{server.ws_url}/v1/jobs/{job_id}/ws") as ws:
            assert json.loads(await ws.get_message())["id"] == 1
            await ws.send_message("not json")
            error = json.loads(await ws.get_message())
            assert error["error"] == "invalid message"
            await ws.send_message(json.dumps({"cancel": "yes"}))
            assert json.loads(await ws.get_message())["error"] == "invalid message"
            assert server.registry.get(job_id).state is JobState.RUNNING
            await ws.send_message(json.dumps({"cancel": True}))
            assert await ws.get_message() == "[CANCELLED]"
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1000
        assert server.registry.get(job_id).state is JobState.CANCELLED


async def test_websocket_resume_and_unknown_job(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 4})
        await server.registry.wait(job_id)
        async with open_ws(f"{server.ws_url}/v1/jobs/{job_id}/ws?last_event_id=2") as ws:
            assert json.loads(await ws.get_message())["id"] == 3
            assert json.loads(await ws.get_message())["id"] == 4
            assert await ws.get_message() == "[DONE]"
        status, error = await ws_handshake_rejection(server.url, "/v1/jobs/nope/ws")
        assert (status, error["error"]) == (404, "not found")


async def test_websocket_client_vanishing_applies_the_cancel_policy(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 1, "block": True, "on_disconnect": "cancel"})
        async with open_ws(f"{server.ws_url}/v1/jobs/{job_id}/ws") as ws:
            await ws.get_message()
            assert server.service.watchers(job_id) == 1
        assert (await server.registry.wait(job_id)).state is JobState.CANCELLED
        await eventually(lambda: server.service.watchers(job_id) == 0)


# ---- auth ----------------------------------------------------------------------------------


async def test_bearer_token_auth(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery, token="s3cret")
        async with httpx.AsyncClient(base_url=srv.url) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = await c.post("/v1/jobs", json={"n": 1}, headers=headers)
                assert response.status_code == 401
                assert response.json()["error"] == "unauthorized"
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await c.get("/v1/jobs")).status_code == 401
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/no/such/route")).status_code == 401
            assert len(srv.registry) == 0
            health = await c.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            good = {"Authorization": "Bearer s3cret"}
            response = await c.post("/v1/jobs", json={"n": 1}, headers=good)
            assert response.status_code == 201
            job_id = response.json()["job_id"]
        status, error = await ws_handshake_rejection(srv.url, f"/v1/jobs/{job_id}/ws")
        assert (status, error["error"]) == (401, "unauthorized")
        async with open_ws(
            f"{srv.ws_url}/v1/jobs/{job_id}/ws",
            extra_headers=[(b"authorization", b"Bearer s3cret")],
        ) as ws:
            lines = [await ws.get_message(), await ws.get_message()]
        assert lines[-1] == "[DONE]"


async def test_serve_refuses_non_loopback_without_token() -> None:
    app = create_app(JobRegistry(), make_executor(Gates()))
    with trio.fail_after(CAP), pytest.raises(ValueError, match="without a token"):
        await serve(app, host="0.0.0.0")


# ---- metrics, health, openapi, blueprint ---------------------------------------------------


async def test_metrics_report_jobs_streams_and_durations(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 4})
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            await response.aread()
        held = await submit(client, {"n": 1, "gate": True})
        async with RawStream(server.url, f"/v1/jobs/{held}/stream") as raw:
            await raw.until("id: 1\n")
            during = await _get(server, "/metrics")
            server.gates.open(held)
            await raw.rest()
        assert during.headers["content-type"].startswith("text/plain")
        text = during.text
        assert 'trio_jobs_jobs{state="completed"} 1.0' in text
        assert 'trio_jobs_jobs{state="running"} 1.0' in text
        assert "trio_jobs_running_jobs 1.0" in text
        assert 'trio_jobs_open_streams{transport="sse"} 1.0' in text
        assert 'trio_jobs_events_streamed_total{transport="sse"} 6.0' in text  # 4 + signal + 1
        assert 'trio_jobs_job_duration_seconds_count{state="completed"} 1.0' in text
        assert "trio_jobs_jobs_submitted_total 2.0" in text


async def test_openapi_describes_every_endpoint(client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    operations = {(path, m) for path, item in doc["paths"].items() for m in item}
    assert operations == {
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/jobs/{job_id}/stream", "get"),
        ("/v1/jobs/{job_id}/ws", "get"),
        ("/v1/jobs/{job_id}/history", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    }
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    options = schemas["JobOptions"]["properties"]
    assert set(options) >= {"timeout_s", "priority", "retry", "tags", "on_disconnect"}


async def test_blueprint_mounts_on_a_daemon_app_with_its_own_routes(
    nursery: trio.Nursery,
) -> None:
    from quart_trio import QuartTrio

    registry = JobRegistry()
    app = QuartTrio("daemon")
    app.register_blueprint(jobs_blueprint(registry, make_executor(Gates()), token="t"))

    @app.get("/v1/workers")
    async def workers() -> dict[str, list[str]]:
        return {"workers": []}

    with trio.fail_after(CAP):
        url = await nursery.start(serve, app)
        async with httpx.AsyncClient(base_url=url) as c:
            assert (await c.get("/v1/workers")).status_code == 401
            auth = {"Authorization": "Bearer t"}
            assert (await c.get("/v1/workers", headers=auth)).json() == {"workers": []}
            job_id = (await c.post("/v1/jobs", json={"n": 1}, headers=auth)).json()["job_id"]
            assert (await registry.wait(job_id)).state is JobState.COMPLETED


# ---- graceful shutdown ---------------------------------------------------------------------


async def test_graceful_shutdown_ends_open_streams_cleanly() -> None:
    """Stopping the server: a stream whose job ends within the grace period gets its
    signal; another gets a clean end of body (never a cut chunk); serve() returns."""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as outer:
            server_scope = trio.CancelScope()
            started: list[Server] = []

            async def run_server(task_status: trio.TaskStatus[None]) -> None:
                with server_scope:
                    async with trio.open_nursery() as nursery:
                        started.append(await start_server(nursery, grace_s=0.4))
                        task_status.started()

            await outer.start(run_server)
            srv = started[0]
            timeout = httpx.Timeout(5, read=None)
            async with httpx.AsyncClient(base_url=srv.url, timeout=timeout) as c:
                forever = await submit(c, {"n": 1, "block": True})
                soon = await submit(c, {"n": 1, "gate": True})
                bodies: dict[str, str] = {}

                async def follow(job_id: str, task_status: trio.TaskStatus[None]) -> None:
                    async with RawStream(srv.url, f"/v1/jobs/{job_id}/stream") as raw:
                        await raw.until("id: 1\n")
                        task_status.started()
                        bodies[job_id] = await raw.rest()

                async with trio.open_nursery() as clients:
                    await clients.start(follow, forever)
                    await clients.start(follow, soon)
                    stop_began = trio.current_time()
                    server_scope.cancel()
                    await trio.sleep(0.1)
                    # New connections are refused while draining.
                    with pytest.raises(httpx.ConnectError):
                        async with httpx.AsyncClient(base_url=srv.url) as fresh:
                            await fresh.get("/health")
                    srv.gates.open(soon)
        stopped_after = trio.current_time() - stop_began
        assert stopped_after < 0.4 + 2.0
        assert data_frames(bodies[soon])[-1].data == "[DONE]"
        assert bodies[forever].endswith("\n\n: server shutting down\n")
        assert [f.data for f in data_frames(bodies[forever])][-1] != "[DONE]"
        # The runner stopped with the app: the blocked job ended cancelled.
        assert srv.registry.get(forever).state is JobState.CANCELLED


async def test_serve_stops_quickly_with_no_open_streams() -> None:
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            srv = await start_server(nursery, grace_s=3.0)
            assert (await _get(srv, "/health")).json()["status"] == "ok"
            began = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - began < 1.0


async def test_serve_stops_at_once_with_idle_keepalive_connections() -> None:
    """Idle keep-alive connections are closed on shutdown: they used to hold the stop for
    the whole grace period (hypercorn's keep-alive timer was cancelled with the request)."""
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(timeout=5) as client:
            async with trio.open_nursery() as nursery:
                srv = await start_server(nursery, grace_s=3.0)
                for path in ("/health", "/v1/jobs", "/metrics"):
                    assert (await client.get(srv.url + path)).status_code == 200
                began = trio.current_time()
                nursery.cancel_scope.cancel()
            assert trio.current_time() - began < 1.0


async def test_idle_keepalive_connections_are_closed_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """hypercorn's keep-alive timeout (5 s) closes a connection nobody uses."""
    async with trio.open_nursery() as nursery:
        srv = await start_server(nursery)
        port = int(srv.url.rsplit(":", 1)[1])
        with trio.fail_after(60):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                conn = h11.Connection(h11.CLIENT)
                answer, _ = await _h11_exchange(stream, conn, "GET", "/health", b"")
                assert answer == 200
                idle_since = trio.current_time()
                assert await stream.receive_some(1024) == b""  # the server closed it
                assert 5.0 <= trio.current_time() - idle_since < 6.0
        nursery.cancel_scope.cancel()


def test_keepalive_and_limits_are_validated() -> None:
    registry = JobRegistry()
    with pytest.raises(ValueError, match="keepalive_s"):
        create_app(registry, None, keepalive_s=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(registry, None, max_body_bytes=0)
    assert math.isinf(JobService(JobRegistry(), None).drain_deadline)


async def test_delete_answers_with_the_settled_record_and_reason() -> None:
    """DELETE returns once the job has ended: the record says cancelled, the history why."""
    registry = JobRegistry()

    async def hang(job_id: str, payload: Any) -> None:
        narrate("start", "waiting")
        await trio.sleep_forever()

    app = create_app(registry, hang)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            base = await nursery.start(serve, app)
            async with httpx.AsyncClient(base_url=base) as client:
                job_id = (await client.post("/v1/jobs", json={})).json()["job_id"]
                while registry.get(job_id).state is not JobState.RUNNING:
                    await trio.sleep(0.001)
                answer = await client.delete(f"/v1/jobs/{job_id}")
                assert answer.status_code == 200
                assert answer.json()["state"] == "cancelled"
                history = (await client.get(f"/v1/jobs/{job_id}/history")).json()["history"]
                assert history[-1] == {
                    "state": "cancelled",
                    "at": history[-1]["at"],
                    "reason": "cancelled over HTTP",
                }
            nursery.cancel_scope.cancel()


async def _h11_exchange(
    stream: trio.SocketStream,
    conn: h11.Connection,
    method: str,
    path: str,
    body: bytes,
    token: str = "t",
    content_type: str = "application/json",
) -> tuple[int, dict[bytes, bytes]]:
    """Send one request, its body a moment after its head (as http.client, under requests
    and schemathesis, writes them), and read its answer."""
    headers = [("Host", "127.0.0.1"), ("Authorization", f"Bearer {token}")]
    headers.append(("Content-Length", str(len(body))))
    if body:
        headers.append(("Content-Type", content_type))
    await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=headers)))
    if body:
        await trio.sleep(0.005)
        await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    status, response_headers = 0, {}
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status, response_headers = event.status_code, dict(event.headers)
        elif isinstance(event, h11.EndOfMessage):
            return status, response_headers


async def test_an_early_answer_to_a_request_with_a_body_does_not_stall_the_connection(
    nursery: trio.Nursery,
) -> None:
    """A 401/404/405/415 given before the body is read says ``Connection: close``, so a
    client that reuses connections opens a new one. Without it, hypercorn left the
    connection unusable: the next request on it got no answer."""
    srv = await start_server(nursery, token="t")
    port = int(srv.url.rsplit(":", 1)[1])
    body = json.dumps({"n": 1, "pad": "x" * 200}).encode()
    with trio.fail_after(CAP):
        for _ in range(10):
            for method, path, token, content_type, status in (
                ("PUT", "/v1/jobs/x", "t", "application/json", 405),
                ("POST", "/no/such/route", "t", "application/json", 404),
                ("POST", "/v1/jobs", "wrong", "application/json", 401),
                ("POST", "/v1/jobs", "t", "text/plain", 415),
                ("POST", "/v1/jobs", "t", "application/json", 201),
            ):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                conn = h11.Connection(h11.CLIENT)
                async with stream:
                    answer, headers = await _h11_exchange(
                        stream, conn, method, path, body, token, content_type
                    )
                    assert answer == status
                    if headers.get(b"connection") == b"close":
                        assert status != 201  # the body was read: the connection stays
                        continue
                    conn.start_next_cycle()
                    with trio.fail_after(2):
                        following = await _h11_exchange(stream, conn, "GET", "/health", b"")
                    assert following[0] == 200
