"""The worker app in-process on real sockets: tiny and OpenAI-upstream backends, cancel."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from servers.worker import WorkerConfig, build_app, tiny_tokens
from tests.daemons import closed_port, collect
from trio_jobs import HTTPStatusError, NarrationEvent, TerminalSignal
from trio_jobs._client import JobClient
from trio_jobs.http import serve


async def _serve(nursery: trio.Nursery, config: WorkerConfig) -> tuple[str, Any]:
    app, worker = build_app(config)
    url: str = await nursery.start(serve, app)
    return url, worker


def _tokens(events: list[NarrationEvent]) -> list[str]:
    return [str(e.fields["token"]) for e in events if e.action == "token"]


async def test_tiny_worker_serves_infer(nursery: trio.Nursery) -> None:
    url, _ = await _serve(nursery, WorkerConfig(worker_id="w1", model="tiny"))
    body = {"operation": "infer", "model": "tiny", "prompt": "abc", "max_tokens": 5, "seed": 7}
    with trio.fail_after(10):
        async with JobClient(url) as client:
            _, events, terminal = await collect(client, body)
    assert terminal is not None and terminal.wire == "[DONE]"
    assert _tokens(events) == list(tiny_tokens("tiny", "abc", max_tokens=5, seed=7))
    assert [e.fields["index"] for e in events if e.action == "token"] == list(range(5))
    assert events[-1].fields["tokens"] == 5


async def test_worker_refuses_other_operations_and_models(nursery: trio.Nursery) -> None:
    url, _ = await _serve(nursery, WorkerConfig(worker_id="w1", model="tiny"))
    with trio.fail_after(10):
        async with JobClient(url) as client:
            with pytest.raises(HTTPStatusError) as info:
                await client.submit({"operation": "status"})
            assert info.value.status_code == 422
            body = {"operation": "infer", "model": "big", "prompt": "x"}
            _, _, terminal = await collect(client, body)
    assert terminal is not None
    assert terminal.wire == "[ERROR] worker w1 serves model 'tiny', not 'big'"


async def test_openai_backend_streams_from_the_upstream(nursery: trio.Nursery) -> None:
    upstream, _ = await _serve(nursery, WorkerConfig(worker_id="up", model="tiny"))
    config = WorkerConfig(worker_id="px", model="tiny", backend="openai", upstream_url=upstream)
    url, _ = await _serve(nursery, config)
    body = {"operation": "infer", "model": "tiny", "prompt": "hi there", "max_tokens": 9}
    with trio.fail_after(10):
        async with JobClient(url) as client:
            _, events, terminal = await collect(client, body)
    assert terminal is not None and terminal.wire == "[DONE]"
    assert _tokens(events) == list(tiny_tokens("tiny", "hi there", max_tokens=9))
    assert events[-1].fields["finish_reason"] == "length"


async def test_cancel_closes_the_upstream_request(nursery: trio.Nursery) -> None:
    slow = WorkerConfig(worker_id="up", model="tiny", token_delay_s=0.05)
    upstream, upstream_worker = await _serve(nursery, slow)
    config = WorkerConfig(worker_id="px", model="tiny", backend="openai", upstream_url=upstream)
    url, _ = await _serve(nursery, config)
    body = {"operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 5000}
    with trio.fail_after(10):
        async with JobClient(url) as client:
            job_id = await client.submit(body)
            terminal: TerminalSignal | None = None
            async with client.stream(job_id) as stream:
                async for item in stream:
                    if isinstance(item, NarrationEvent):
                        if item.action == "token" and item.fields["index"] == 2:
                            assert upstream_worker.open_completions == 1
                            await client.cancel(job_id)
                    else:
                        terminal = item
        assert terminal is not None and terminal.wire == "[CANCELLED]"
        while upstream_worker.open_completions:
            await trio.sleep(0.01)


async def test_openai_backend_reports_upstream_errors(nursery: trio.Nursery) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    config = WorkerConfig(worker_id="px", model="tiny", backend="openai", upstream_url=dead)
    url, _ = await _serve(nursery, config)
    with trio.fail_after(10):
        async with JobClient(url) as client:
            _, _, terminal = await collect(
                client, {"operation": "infer", "model": "tiny", "prompt": "x"}
            )
    assert terminal is not None
    assert terminal.wire.startswith(f"[ERROR] upstream {dead} is unreachable: ConnectError")


async def test_chat_completions_validates_its_body(nursery: trio.Nursery) -> None:
    url, _ = await _serve(nursery, WorkerConfig(worker_id="w", model="tiny"))
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            response = await http.post(f"{url}/v1/chat/completions", json={"model": "tiny"})
    assert response.status_code == 422
    assert "messages" in response.json()["detail"]


async def test_chat_completions_without_streaming_and_models(nursery: trio.Nursery) -> None:
    url, _ = await _serve(nursery, WorkerConfig(worker_id="w", model="tiny"))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 4}
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            answer = (await http.post(f"{url}/v1/chat/completions", json=body)).json()
            models = (await http.get(f"{url}/v1/models")).json()
    assert answer["choices"][0]["message"]["content"] == "".join(
        tiny_tokens("tiny", "hey", max_tokens=4)
    )
    assert answer["usage"]["completion_tokens"] == 4
    assert models["data"] == [{"id": "tiny", "object": "model", "owned_by": "trio-jobs"}]


class _GreedyUpstream:
    """An OpenAI-compatible upstream (quart-trio on hypercorn) that ignores ``max_tokens``:
    it streams 50 content chunks whatever it is asked, and records the request bodies."""

    def __init__(self) -> None:
        from quart import Response, request
        from quart_trio import QuartTrio

        self.bodies: list[dict[str, Any]] = []
        self.app = QuartTrio("greedy")

        async def chat() -> Response:
            self.bodies.append(await request.get_json())

            async def chunks() -> AsyncIterator[bytes]:
                for n in range(50):
                    delta = {"content": f" w{n}"}
                    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    await trio.sleep(0)
                yield b"data: [DONE]\n\n"

            response = Response(chunks(), mimetype="text/event-stream")
            response.timeout = None
            return response

        self.app.add_url_rule("/v1/chat/completions", "chat", chat, methods=["POST"])


async def test_openai_backend_honours_max_tokens(nursery: trio.Nursery) -> None:
    """``max_tokens`` goes upstream, and the worker stops after that many tokens even when
    the upstream ignores it."""
    upstream = _GreedyUpstream()
    upstream_url: str = await nursery.start(serve, upstream.app)
    config = WorkerConfig(worker_id="px", model="m", backend="openai", upstream_url=upstream_url)
    url, _ = await _serve(nursery, config)
    body = {"operation": "infer", "model": "m", "prompt": "p", "max_tokens": 7}
    with trio.fail_after(10):
        async with JobClient(url) as client:
            _, events, terminal = await collect(client, body)
    assert terminal is not None and terminal.wire == "[DONE]"
    assert _tokens(events) == [f" w{n}" for n in range(7)]
    assert events[-1].fields["finish_reason"] == "length"
    assert upstream.bodies[0]["max_tokens"] == 7


async def test_openai_backend_readiness_follows_its_upstream(nursery: trio.Nursery) -> None:
    """With its upstream down, a worker's ``/health`` is 503 naming the upstream and its
    state is ``not_ready``; once the upstream answers it is ready again."""
    port = closed_port()
    upstream = f"http://127.0.0.1:{port}"
    config = WorkerConfig(
        worker_id="px", model="tiny", backend="openai", upstream_url=upstream, heartbeat_s=0.05
    )
    url, worker = await _serve(nursery, config)
    nursery.start_soon(worker.readiness_loop, url)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url) as http:
            down = await http.get("/health")
            assert down.status_code == 503
            assert down.json()["state"] == "not_ready"
            problem = down.json()["problem"]
            assert problem.startswith(f"upstream {upstream} is unreachable: ConnectError: ")
            assert worker.health()["ready"] is False
            await _serve_on(nursery, port)
            while (await http.get("/health")).status_code != 200:
                await trio.sleep(0.02)
    assert (worker.state, worker.problem) == ("ready", None)


async def _serve_on(nursery: trio.Nursery, port: int) -> None:
    app, _ = build_app(WorkerConfig(worker_id="up", model="tiny"))
    await nursery.start(partial(serve, app, port=port))


async def test_a_proxy_named_for_the_upstream_is_reported_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker reaches its upstream directly; an environment proxy that would apply
    to it is named in a warning at start (a local upstream exempted by NO_PROXY is not)."""
    from servers.worker._backends import OpenAIBackend

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    for url, warned in (("https://api.example.com", True), ("http://127.0.0.1:8080", False)):
        caplog.clear()
        transport = OpenAIBackend(url).open_transport()
        await transport.aclose()
        named = [r.getMessage() for r in caplog.records if "proxy" in r.getMessage()]
        assert bool(named) is warned, named
        if warned:
            assert "http://proxy.example:3128" in named[0] and url in named[0]
