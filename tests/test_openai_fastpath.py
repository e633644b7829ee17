"""The queen's OpenAI ``POST`` routes answered on the ASGI fast path below Quart, through
real sockets: the fast path answers them (while Quart would run nothing else), and its
answers are Quart's, errors included; a client leaving a waiting request cancels its job.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import quart
import trio

from servers.queen._config import QueenConfig
from servers.queen._openai import add_openai_routes
from servers.queen._server import Queen, parse_queen_payload
from trio_jobs import JobRegistry, JobState
from trio_jobs.http import create_app, serve
from trio_jobs.http._asgi import JobRoutes

CAP = 10.0
TOKEN = "sk-fast"


@asynccontextmanager
async def queen_app(
    *, hooked: bool = False, replace: str | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, list[str]]]:
    """An in-process queen (no worker) serving the OpenAI API; ``hooked``: with a request
    hook of its own, so that Quart answers every request; ``replace``: an endpoint whose
    view is replaced by one that calls it (yields the paths it saw)."""
    async with trio.open_nursery() as nursery:
        registry = JobRegistry(actor="queen")
        config = QueenConfig(token=TOKEN, heartbeat_ttl_s=0.05, schedule_wait_s=0.05)
        queen = Queen(config, registry, nursery)
        app = create_app(
            registry,
            queen.execute,
            name="queen",
            parse_payload=parse_queen_payload,
            token=TOKEN,
            max_body_bytes=2048,
        )
        add_openai_routes(app, queen)
        if hooked:

            @app.before_request
            async def nothing() -> None:
                pass

        seen: list[str] = []
        if replace is not None:
            view = app.view_functions[replace]

            async def recording(**kwargs: Any) -> Any:
                seen.append(quart.request.path)
                return await view(**kwargs)

            app.view_functions[replace] = recording
        url = await nursery.start(serve, app)
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            yield client, seen
        nursery.cancel_scope.cancel()


@pytest.fixture
def fast_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every request the fast path answered itself."""
    seen: list[str] = []
    answer = JobRoutes._answer_extra

    async def recording(self: JobRoutes, handler: Any, scope: Any, *args: Any) -> None:
        seen.append(scope["path"])
        await answer(self, handler, scope, *args)

    monkeypatch.setattr(JobRoutes, "_answer_extra", recording)
    return seen


AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
REQUESTS: list[tuple[str, dict[str, str], bytes]] = [
    ("/v1/chat/completions", {}, json.dumps(CHAT).encode()),  # no token: 401
    ("/v1/chat/completions", {"Content-Type": "text/plain"}, b"{}"),  # 415
    ("/v1/chat/completions", {}, b"{not json"),
    ("/v1/chat/completions", {}, b"[1]"),
    ("/v1/chat/completions", {}, b""),
    ("/v1/chat/completions", {}, json.dumps({**CHAT, "messages": []}).encode()),
    ("/v1/chat/completions", {}, json.dumps({**CHAT, "temperature": 9}).encode()),
    ("/v1/chat/completions", {}, json.dumps({**CHAT, "tools": [{"x": 1}]}).encode()),
    ("/v1/chat/completions", {}, json.dumps(CHAT).encode()),  # unknown model: 404
    ("/v1/chat/completions", {}, b" " * 4096),  # over max_body_bytes: 413
    ("/v1/completions", {}, json.dumps({"model": "m", "prompt": ["a", "b"]}).encode()),
    ("/v1/completions", {}, json.dumps({"model": "m", "prompt": "a"}).encode()),
    ("/v1/responses", {}, json.dumps({"model": "m", "input": 3}).encode()),
    ("/v1/responses", {}, json.dumps({"model": "m", "input": "x"}).encode()),
]
_SAME_HEADERS = ("content-type", "retry-after", "www-authenticate", "x-job-id")
"""(Not ``Connection``: whether Quart read an unread body before its 401 is a race.)"""


async def every_answer(client: httpx.AsyncClient) -> list[Any]:
    """One answer of each request (the first without the token), as comparable data."""
    out = []
    for path, headers, body in REQUESTS:
        sent = {"Content-Type": "application/json", **headers}
        if out:
            sent.update(AUTH)
        response = await client.post(path, content=body, headers=sent)
        kept = {name: response.headers.get(name) for name in _SAME_HEADERS}
        out.append((response.status_code, kept, response.json()))
    return out


async def test_the_fast_path_answers_every_error_as_quart_does(fast_answers: list[str]) -> None:
    with trio.fail_after(CAP):
        async with queen_app(hooked=False) as (client, _):
            fast = await every_answer(client)
        answered = list(fast_answers)
        async with queen_app(hooked=True) as (client, _):
            slow = await every_answer(client)
    assert fast == slow
    assert answered == [path for path, _, _ in REQUESTS]
    assert fast_answers == answered  # the hooked app's requests all went through Quart
    statuses = [status for status, _, _ in fast]
    assert statuses == [401, 415, 400, 400, 400, 400, 400, 400, 404, 413, 400, 404, 400, 404]
    for _, _, body in fast:
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_a_replaced_view_or_a_query_string_goes_through_quart(
    fast_answers: list[str],
) -> None:
    """The fast path answers only while the route's view is the one registered with it,
    and a request without a query string."""
    post: Any = {"content": b"[]", "headers": {**AUTH, "Content-Type": "application/json"}}
    with trio.fail_after(CAP):
        async with queen_app(replace="openai_chat") as (client, through_quart):
            for url in ("/v1/completions", "/v1/completions?x=1", "/v1/chat/completions"):
                assert (await client.post(url, **post)).status_code == 400
    assert fast_answers == ["/v1/completions"]
    assert through_quart == ["/v1/chat/completions"]


async def test_a_client_leaving_while_its_chat_waits_cancels_the_job(
    fast_answers: list[str],
) -> None:
    """A streamed chat waits (on the fast path) for its only worker, which stays at its
    capacity: the client leaving cancels the wait and the job, as under Quart."""
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            registry = JobRegistry(actor="queen")
            queen = Queen(QueenConfig(schedule_wait_s=30), registry, nursery)
            app = create_app(
                registry, queen.execute, name="queen", parse_payload=parse_queen_payload
            )
            add_openai_routes(app, queen)
            beat = {"worker_id": "w1", "url": "http://127.0.0.1:9", "model": "m"}
            queen.workers.beat({**beat, "state": "busy", "running": 1, "capacity": 1})
            url = await nursery.start(serve, app)
            host, port = url.removeprefix("http://").split(":")
            body = json.dumps(CHAT).encode()
            head = (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock = await trio.open_tcp_stream(host, int(port))
            await sock.send_all(head.encode() + body)
            while not registry.list_jobs(JobState.RUNNING):
                await trio.sleep(0.001)
            (job,) = registry.list_jobs()
            await sock.aclose()
            record = await registry.wait(job.id)
            nursery.cancel_scope.cancel()
    assert record.state is JobState.CANCELLED
    assert fast_answers == ["/v1/chat/completions"]
