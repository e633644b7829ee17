"""Third-party clients read our streams as we mean them, against a real hypercorn on
127.0.0.1 port 0: httpx-sse, the openai SDK (its ``SSEDecoder`` and ``openai.Stream``
through the SDK's raw ``client.get(..., stream=True)``), sseclient-py over requests, and
the ``websockets`` client.

The SSE decoders of httpx-sse and openai dispatch an empty event at a blank line ending a
block without ``data:`` once an id was seen (a lone ``retry:`` block, a keep-alive comment
block); our framing never gives them one. Every stream here is made to carry keep-alive
comments between events (a short ``keepalive_s``, and a job held at a gate for a bounded
real-time wait), so each client meets them. Sync clients run in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import httpx_sse
import openai
import pytest
import requests
import sseclient
import trio
import websockets.exceptions
import websockets.sync.client
from openai._streaming import SSEDecoder

from .test_http_server import CAP, Server, eventually, start_server, submit

N = 3  # events before the gate; one more after it, then the signal


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    return await start_server(nursery, keepalive_s=0.01)


async def gated_job(server: Server) -> str:
    """A job that narrates ``N`` events and then waits at its gate."""
    async with httpx.AsyncClient(base_url=server.url) as c:
        job_id = await submit(c, {"n": N, "gate": True})
    await eventually(lambda: len(server.registry.events(job_id)) == N)
    return job_id


async def open_gate_after_keepalives(server: Server, job_id: str) -> None:
    """Let a few keep-alive intervals pass with the stream open (a bounded real wait),
    then let the job finish."""
    await eventually(lambda: server.service.watchers(job_id) >= 1)
    await trio.sleep(0.1)  # ~10 keep-alive intervals on the real socket
    server.gates.open(job_id)


def check_events(events: list[tuple[str | None, str]]) -> None:
    """(id, data) of every dispatched event: each data is JSON or the signal, none empty,
    ids 1..N+2 in order, the signal last and with its id."""
    assert events, "no event"
    assert all(data for _, data in events), events
    assert [ident for ident, _ in events] == [str(i) for i in range(1, N + 3)], events
    for ident, data in events[:-1]:
        assert json.loads(data)["id"] == int(ident or 0)
    assert events[-1][1] == "[DONE]"


async def follow_while_gated(
    server: Server, read: Callable[[str], Awaitable[Any]]
) -> tuple[str, Any]:
    job_id = await gated_job(server)
    result: list[Any] = []

    async def reader() -> None:
        result.append(await read(job_id))

    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await open_gate_after_keepalives(server, job_id)
    return job_id, result[0]


def stream_url(server: Server, job_id: str) -> str:
    return f"{server.url}/v1/jobs/{job_id}/stream"


# ---- httpx-sse ----------------------------------------------------------------------------


async def test_httpx_sse_sees_only_real_events(server: Server) -> None:
    async def read(job_id: str) -> list[Any]:
        timeout = httpx.Timeout(5, read=None)
        async with httpx.AsyncClient(timeout=timeout) as c:
            async with httpx_sse.aconnect_sse(c, "GET", stream_url(server, job_id)) as source:
                source.response.raise_for_status()
                return [sse async for sse in source.aiter_sse()]

    _, events = await follow_while_gated(server, read)
    check_events([(sse.id, sse.data) for sse in events])
    assert events[0].retry == 2000
    assert all(sse.event == "message" for sse in events)


async def test_httpx_sse_reads_a_one_call_post(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as c:
            async with httpx_sse.aconnect_sse(
                c, "POST", f"{server.url}/v1/jobs", json={"n": N + 1}
            ) as source:
                assert source.response.status_code == 200
                events = [(sse.id, sse.data) async for sse in source.aiter_sse()]
    check_events(events)


# ---- openai -------------------------------------------------------------------------------


async def test_openai_sse_decoder_sees_only_real_events(server: Server) -> None:
    async def read(job_id: str) -> list[Any]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=None)) as c:
            async with c.stream("GET", stream_url(server, job_id)) as response:
                return [sse async for sse in SSEDecoder().aiter_bytes(response.aiter_bytes())]

    _, events = await follow_while_gated(server, read)
    check_events([(sse.id, sse.data) for sse in events])
    assert events[0].retry == 2000
    # What openai.Stream does with each event before [DONE]: it must parse.
    assert [sse.json()["id"] for sse in events[:-1]] == list(range(1, N + 2))


async def test_openai_stream_through_the_sdks_raw_get(server: Server) -> None:
    def read_sync(job_id: str) -> list[Any]:
        with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as client:
            stream = client.get(
                f"/v1/jobs/{job_id}/stream",
                cast_to=object,
                stream=True,
                stream_cls=openai.Stream[object],
            )
            with stream:
                return list(stream)

    async def read(job_id: str) -> list[Any]:
        return await trio.to_thread.run_sync(read_sync, job_id)

    job_id, items = await follow_while_gated(server, read)
    # openai.Stream ends at [DONE]; everything before it is an event's JSON.
    assert [item["id"] for item in items] == list(range(1, N + 2))
    assert items == [json.loads(e.wire) for e in server.registry.events(job_id)]


# ---- sseclient-py over requests -------------------------------------------------------------


async def test_sseclient_py_over_requests(server: Server) -> None:
    def read_sync(job_id: str) -> list[Any]:
        with requests.get(stream_url(server, job_id), stream=True, timeout=(5, 30)) as response:
            response.raise_for_status()
            client = sseclient.SSEClient(response.iter_content(chunk_size=None))
            return [(event.id, event.data, event.retry) for event in client.events()]

    async def read(job_id: str) -> list[Any]:
        return await trio.to_thread.run_sync(read_sync, job_id)

    _, events = await follow_while_gated(server, read)
    check_events([(ident, data) for ident, data, _ in events])
    assert events[0][2] == "2000"


# ---- websockets -------------------------------------------------------------------------------


async def test_websockets_client_reads_lines_and_sees_1000(server: Server) -> None:
    def read_sync(job_id: str) -> tuple[list[str], int | None]:
        url = f"{server.ws_url}/v1/jobs/{job_id}/ws"
        with websockets.sync.client.connect(url, open_timeout=5) as ws:
            lines = [str(message) for message in ws]  # ends on a normal close
            return lines, ws.close_code

    async def read(job_id: str) -> tuple[list[str], int | None]:
        return await trio.to_thread.run_sync(read_sync, job_id)

    job_id, (lines, code) = await follow_while_gated(server, read)
    assert code == 1000
    assert lines[-1] == "[DONE]"
    assert lines[:-1] == [e.wire for e in server.registry.events(job_id)]


async def test_websockets_client_from_a_foreign_origin_is_refused(server: Server) -> None:
    def connect_sync(job_id: str) -> int:
        url = f"{server.ws_url}/v1/jobs/{job_id}/ws"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            websockets.sync.client.connect(url, origin="http://evil.example", open_timeout=5)
        body = json.loads(refused.value.response.body or b"{}")
        assert body["error"] == "forbidden"
        return refused.value.response.status_code

    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 1})
        assert await trio.to_thread.run_sync(connect_sync, job_id) == 403
