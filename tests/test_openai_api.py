"""The queen's OpenAI-compatible API through the official ``openai`` SDK (sync and async
clients) and LangChain's ``ChatOpenAI``, against real daemons on 127.0.0.1.

One hive and one queen (bearer token = API key, SQLite store, a fixed port so it can be
restarted) serve the module; the queen spawns a fast ``tiny`` worker, a ``slow`` one (50 ms
per token) and an OpenAI-backend ``chain`` worker whose upstream is a tokenless tiny worker
started by the test. Expected texts come from ``tiny_tokens`` itself. Every async test is
bounded by ``trio.fail_after``; tests that cancel check the worker's own job record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from servers._openai_wire import TOKEN as PLACEHOLDER
from servers._openai_wire import chat_chunk, frame_template, render_messages, sse_frame
from servers.worker import tiny_tokens
from tests.daemons import (
    Cluster,
    closed_port,
    collect,
    running_jobs,
    spawn_worker,
    wait_idle,
)
from trio_jobs._client import JobClient

TOKEN = "sk-test-queen-token"
ORIGIN = "https://chat.example"


@dataclass
class Env:
    queen: str
    hive: str
    port: int
    store: Path
    cluster: Cluster
    chain_worker: dict[str, Any]
    slow_worker: dict[str, Any]

    @property
    def base(self) -> str:
        return self.queen + "/v1"

    def client(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base, api_key=TOKEN, max_retries=0, **options)

    def aclient(self, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base, api_key=TOKEN, max_retries=0, **options)

    def queen_argv(self) -> list[str]:
        return [
            *("queen", "--port", str(self.port), "--hive", f"localhost={self.hive}"),
            *("--store", f"sqlite:{self.store}", "--token", TOKEN),
            *("--schedule-wait", "1", "--heartbeat-ttl", "2"),
            *("--cors-origin", ORIGIN),
        ]


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("openai")
    cluster = Cluster(root)
    try:
        hive = cluster.start(
            "hive",
            [
                *("hive", "--port", "0", "--models-dir", str(root / "models")),
                *("--heartbeat-s", "0.3", "--worker-grace", "3", "--token", TOKEN),
            ],
        )
        # A tokenless tiny worker, not registered anywhere: the OpenAI-compatible upstream.
        upstream = cluster.start("upstream", ["worker", "--port", "0", "--model", "chain"])
        env = Env("", hive, closed_port(), root / "queen.db", cluster, {}, {})
        env.queen = cluster.start("queen", env.queen_argv())

        async def spawn() -> None:
            async with JobClient(env.queen, token=TOKEN) as client:
                await spawn_worker(client, "tiny")
                env.slow_worker = await spawn_worker(client, "slow", token_delay_s=0.05)
                body = {
                    "operation": "worker_spawn",
                    "model": "chain",
                    "backend": "openai",
                    "upstream_url": upstream,
                }
                _, events, terminal = await collect(client, body, timeout_s=30)
                assert terminal is not None and terminal.wire == "[DONE]", terminal
                env.chain_worker = dict(events[-1].fields["worker"])

        trio.run(spawn)
        yield env
    finally:
        cluster.close()


def _expected(model: str, prompt: str, n: int, **sampling: Any) -> str:
    return "".join(tiny_tokens(model, prompt, max_tokens=n, **sampling))


def _job(env: Env, job_id: str) -> dict[str, Any]:
    return _job_at(env.queen, job_id)


def _job_at(url: str, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/jobs/{job_id}", headers=_headers())
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data


def _events(url: str, job_id: str) -> list[dict[str, Any]]:
    """A finished job's events, read from its SSE stream."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/stream", headers=_headers()) as r:
        lines = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
    return [json.loads(line) for line in lines if line.startswith("{")]


def _first_event(url: str, job_id: str, action: str) -> dict[str, Any]:
    """The job's first event with ``action``, read from its stream as it comes."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/stream", headers=_headers(), timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event: dict[str, Any] = json.loads(line[6:])
                if event["action"] == action:
                    return event
    raise AssertionError(f"{job_id} ended without a {action!r} event")


def _remote_job(env: Env, job_id: str) -> tuple[str, str]:
    """(worker URL, worker job id) of the queen job ``job_id`` (running or not)."""
    event = _first_event(env.queen, job_id, "forward")
    return event["target"], event["remote_job_id"]


def _wait_state(url: str, job_id: str, states: set[str], within_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        record = httpx.get(f"{url}/v1/jobs/{job_id}", headers=_headers()).json()
        if record["state"] in states or time.monotonic() > deadline:
            assert record["state"] in states, record
            return dict(record)
        time.sleep(0.01)


def _restart_queen(env: Env, name: str) -> None:
    """Start the queen again on its port and store; wait until its workers reported."""
    env.queen = env.cluster.start(name, env.queen_argv())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        models = httpx.get(f"{env.base}/models", headers=_headers()).json()["data"]
        if {"tiny", "slow"} <= {m["id"] for m in models}:
            return
        time.sleep(0.05)
    raise AssertionError("the workers did not report to the restarted queen")


def _wait_for_model(client: openai.OpenAI, model: str, within_s: float = 10.0) -> None:
    """Until a worker of ``model`` has reported to the client's queen (bounded poll)."""
    deadline = time.monotonic() + within_s
    while model not in {m.id for m in client.models.list()}:
        assert time.monotonic() < deadline, f"no worker of {model!r} reported"
        time.sleep(0.05)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# ---- models, chat, completions --------------------------------------------------------------


def test_models_are_the_live_workers_models(env: Env) -> None:
    with env.client() as client:
        ids = {m.id for m in client.models.list()}
        assert {"tiny", "slow", "chain"} <= ids
        assert client.models.retrieve("tiny").owned_by == "trio-jobs"
        with pytest.raises(openai.NotFoundError) as info:
            client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_chat_completion_answers_with_the_job_in_its_id(env: Env) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello trio"}]},
    ]
    with env.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=messages, max_tokens=6, user="u1", presence_penalty=0.5
        )
        answer = raw.parse()
    job_id = raw.headers["X-Job-Id"]
    assert answer.id == f"chatcmpl-{job_id}"
    assert answer.object == "chat.completion"
    choice = answer.choices[0]
    prompt = render_messages(messages)
    assert choice.message.role == "assistant"
    assert choice.message.content == _expected("tiny", prompt, 6)
    assert choice.finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 6
    assert answer.usage.prompt_tokens == len(prompt.split())
    assert answer.usage.total_tokens == 6 + len(prompt.split())
    record = _job(env, job_id)
    assert record["state"] == "completed"
    assert record["tags"] == {"openai": "chat"}
    assert record["payload"]["messages"][1]["content"][0]["text"] == "hello trio"


def test_chat_stream_async_role_first_then_deltas_usage_and_done(env: Env) -> None:
    """AsyncOpenAI on its home event loop (asyncio; under trio the SDK leaves its SSE
    generators to the garbage collector)."""

    async def main() -> list[Any]:
        async with env.aclient() as client:
            stream = await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "stream it"}],
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    assert ids.pop().startswith("chatcmpl-job-")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == _expected("tiny", "stream it", 7)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_wire_ends_with_done_and_stop_strings_end_with_stop(env: Env) -> None:
    full = _expected("tiny", "wire", 12, temperature=0.0)
    stop = full.split()[5]
    cut = full[: full.index(stop)] if stop in full else full
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "wire"}],
        "max_tokens": 12,
        "temperature": 0,
        "stop": stop,
        "stream": True,
    }
    url = f"{env.base}/chat/completions"
    with httpx.stream("POST", url, json=body, headers=_headers()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_a_stream_head_comes_with_its_first_chunk_in_one_write(env: Env, path: str) -> None:
    """The queen's fast path writes a stream's head with its first chunk (the role chunk
    and the first tokens): the first read of the socket has both."""
    import socket

    body: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "stream": True}
    if path == "completions":
        body["prompt"] = "one"
    else:
        body["messages"] = [{"role": "user", "content": "one"}]
    data = json.dumps(body).encode()
    host, port = env.queen.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /v1/{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        sock.sendall(head.encode() + data)
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b"\r\n\r\n" in first
    assert b"data: {" in first.split(b"\r\n\r\n", 1)[1]


def test_completions_streamed_and_not_with_length_finish(env: Env) -> None:
    with env.client() as client:
        answer = client.completions.create(model="tiny", prompt="once upon", max_tokens=5)
        assert answer.id.startswith("cmpl-job-")
        assert answer.choices[0].text == _expected("tiny", "once upon", 5)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 5
        default = client.completions.create(model="tiny", prompt="defaults")
        assert default.usage is not None
        assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens
        stream = client.completions.create(
            model="tiny",
            prompt=["once upon"],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


# ---- errors ---------------------------------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    assert set(body) >= {"message", "type", "param", "code"}, body
    return body


def test_every_error_is_an_openai_error_object_with_the_sdk_exception(env: Env) -> None:
    hello = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=env.base, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as auth:
            bad.chat.completions.create(model="tiny", messages=hello)
        assert _error(auth.value)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with env.client() as client:
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-nope", messages=hello)
        assert _error(missing.value)["code"] == "model_not_found"
        assert _error(missing.value)["param"] == "model"
        for wrong, param in (
            ({"messages": []}, "messages"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
            ({"messages": hello, "temperature": 5}, "temperature"),
            ({"messages": hello, "n": 2}, "n"),
            ({"messages": hello, "max_tokens": 0}, "max_tokens"),
            ({"messages": hello, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
            ({"messages": "hello"}, "messages"),
        ):
            with pytest.raises(openai.BadRequestError) as invalid:
                client.chat.completions.create(model="tiny", **wrong)  # type: ignore[call-overload]
            error = _error(invalid.value)
            assert error["param"] == param, error
            assert error["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt=["a", "b"])
        with pytest.raises(openai.BadRequestError) as previous:
            client.responses.create(model="tiny", input="x", previous_response_id="resp_1")
        assert "not supported" in _error(previous.value)["message"]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("resp_job-unknown")
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("not-a-response")
        for size in (1 << 20, 9 << 20):  # the job API's limit (1 MiB), not Quart's 8 MiB
            with pytest.raises(openai.APIStatusError) as too_big:
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "x" * size}]
                )
            assert too_big.value.status_code == 413
            assert _error(too_big.value)["code"] == "request_too_large"
            assert "1048576 bytes" in _error(too_big.value)["message"]
        # Just under the limit: served (the worker takes the forwarded chat, twice as big).
        big = "é" * ((1 << 20) // 2 - 200)
        done = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": big}], max_tokens=2
        )
        assert done.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIStatusError) as too_big_response:
            client.responses.create(model="tiny", input="y" * (1 << 20))
        assert too_big_response.value.status_code == 413
    raw = httpx.post(
        f"{env.base}/chat/completions", content=b"{}", headers={**_headers(), "Content-Type": "x"}
    )
    assert raw.status_code == 415
    assert raw.json()["error"]["type"] == "invalid_request_error"
    broken = httpx.post(
        f"{env.base}/chat/completions",
        content=b"{nope",
        headers={**_headers(), "Content-Type": "application/json"},
    )
    assert broken.status_code == 400
    assert "JSON" in broken.json()["error"]["message"]


def test_cross_site_rules_hold_and_a_browser_sdk_passes_the_preflight(env: Env) -> None:
    url = f"{env.base}/chat/completions"
    sdk_headers = "authorization,content-type,x-stainless-os,x-stainless-retry-count"
    preflight = httpx.options(
        url,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": sdk_headers,
        },
    )
    assert preflight.status_code == 204
    allowed = {
        h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")
    }
    assert set(sdk_headers.split(",")) <= allowed
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ok = httpx.post(url, json=body, headers={**_headers(), "Origin": ORIGIN})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Job-Id" in ok.headers["access-control-expose-headers"]
    foreign = httpx.post(url, json=body, headers={**_headers(), "Origin": "https://evil.example"})
    assert foreign.status_code == 403


def test_no_worker_that_can_take_it_is_503_with_retry_after(env: Env) -> None:
    """A worker that heartbeats but cannot be reached: the job fails before any worker
    took it, answered 503 (the SDK's InternalServerError, which it retries)."""
    beat = {
        "worker_id": "ghost-1",
        "url": f"http://127.0.0.1:{closed_port()}",
        "model": "ghost",
        "state": "ready",
    }
    httpx.post(f"{env.queen}/v1/workers/heartbeat", json=beat, headers=_headers())
    with env.client() as client:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.with_raw_response.create(
                model="ghost", messages=[{"role": "user", "content": "x"}], stream=True
            )
    assert info.value.status_code == 503
    assert info.value.response.headers["Retry-After"] == "1"
    assert _error(info.value)["code"] == "no_worker_available"
    job_id = info.value.response.headers.get("X-Job-Id")
    failed = httpx.get(
        f"{env.queen}/v1/jobs", params={"tag": "openai:chat", "state": "failed"}, headers=_headers()
    ).json()["jobs"]
    assert failed, job_id


def test_a_foreground_streamed_response_that_cannot_start_is_an_error_status(env: Env) -> None:
    """Known before the stream starts (unknown model, no worker could take it): an HTTP
    error status, as for chat, not a stream ending in response.failed."""
    beat = {
        "worker_id": "ghost-2",
        "url": f"http://127.0.0.1:{closed_port()}",
        "model": "ghost-responses",
        "state": "ready",
    }
    httpx.post(f"{env.queen}/v1/workers/heartbeat", json=beat, headers=_headers())
    with env.client() as client:
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.create(model="ghost-responses", input="x", stream=True)
        assert info.value.status_code == 503
        assert _error(info.value)["code"] == "no_worker_available"
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.create(model="gpt-nope", input="x", stream=True)
        assert _error(missing.value)["code"] == "model_not_found"


def test_a_model_whose_workers_are_all_at_capacity_is_429_with_retry_after(env: Env) -> None:
    """A worker spawned with ``max_concurrent`` 1 advertises that capacity: while one
    stream holds its slot, requests for its model wait the queen's ``schedule_wait`` (1 s)
    and then get 429 (``RateLimitError``, ``Retry-After``, the job named) and a plain job
    fails with the same clear error, while a background response stays ``queued``; a
    model whose only worker is live but not ready stays 503. Once the stream is closed,
    the slot serves the background response (it waited longest), then the next
    request."""

    async def spawn() -> dict[str, Any]:
        async with JobClient(env.queen, token=TOKEN) as jobs:
            return await spawn_worker(jobs, "capped", token_delay_s=0.05, max_concurrent=1)

    worker = trio.run(spawn)
    hello = [{"role": "user", "content": "x"}]
    sick = {"worker_id": "sick-1", "url": "http://127.0.0.1:9", "model": "sick"}
    with env.client() as client:
        holder = client.chat.completions.create(
            model="capped", messages=hello, max_tokens=1000, stream=True
        )
        next(iter(holder))  # the worker took it: its one slot is held
        listed = httpx.get(f"{env.queen}/v1/workers", headers=_headers()).json()["workers"]
        assert [w["capacity"] for w in listed if w["worker_id"] == worker["id"]] == [1]
        beat = {**sick, "state": "not_ready"}
        httpx.post(f"{env.queen}/v1/workers/heartbeat", json=beat, headers=_headers())

        def chat() -> openai.APIStatusError:
            with pytest.raises(openai.RateLimitError) as info:
                client.chat.completions.create(model="capped", messages=hello)
            return info.value

        def streamed_response() -> openai.APIStatusError:
            with pytest.raises(openai.RateLimitError) as info:
                client.responses.create(model="capped", input="x", stream=True)
            return info.value

        def not_ready() -> openai.APIStatusError:
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="sick", messages=hello)
            return info.value

        def background() -> Any:
            return client.responses.create(
                model="capped", input="x", background=True, max_output_tokens=2
            )

        def plain_job() -> Any:
            body = {"operation": "infer", "model": "capped", "prompt": "x"}
            created = httpx.post(f"{env.queen}/v1/jobs", json=body, headers=_headers())
            return _wait_state(env.queen, created.json()["job_id"], {"failed"})

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            calls = [chat, streamed_response, not_ready, background, plain_job]
            started = time.monotonic()
            busy_chat, busy_response, unready, queued, job = (
                f.result() for f in [pool.submit(call) for call in calls]
            )
            assert time.monotonic() - started >= 1.0  # each waited the schedule_wait
        for busy in (busy_chat, busy_response):
            assert busy.status_code == 429
            assert busy.response.headers["Retry-After"] == "1"
            error = _error(busy)
            assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
            assert "stayed at capacity for 1s" in error["message"], error
            job_id = busy.response.headers["X-Job-Id"]
            assert _job(env, job_id)["state"] == "failed"
        assert unready.status_code == 503
        assert _error(unready)["code"] == "no_worker_available"
        assert client.responses.retrieve(queued.id).status == "queued"
        assert job["error"] == (
            f"all 1 live worker(s) serving model 'capped' stayed at capacity for 1s "
            f"({worker['id']} 1/1 jobs)"
        )
        holder.close()
        done = client.chat.completions.create(model="capped", messages=hello, max_tokens=2)
        assert done.choices[0].finish_reason == "length"
        scheduled = [
            _epoch(_first_event(env.queen, job_id, "infer_worker")["ts"])
            for job_id in (queued.id.removeprefix("resp_"), done.id.removeprefix("chatcmpl-"))
        ]
        assert scheduled == sorted(scheduled)
        assert client.responses.retrieve(queued.id).status == "incomplete"


def test_background_responses_wait_for_a_slot_in_turn_and_cancel_while_queued(
    env: Env,
) -> None:
    """Behind a stream that holds a worker's only slot, background responses stay
    ``queued`` past the queen's ``schedule_wait`` (where a chat gets 429); one cancelled
    while queued ends ``cancelled`` (again on a second cancel) without reaching the
    worker; the others get the slot one after another in the order they came, and their
    streams say ``response.in_progress`` only then."""

    async def spawn() -> None:
        async with JobClient(env.queen, token=TOKEN) as jobs:
            await spawn_worker(jobs, "one-slot", token_delay_s=0.02, max_concurrent=1)

    trio.run(spawn)
    hello = [{"role": "user", "content": "x"}]

    def job_of(response: Any) -> str:
        return str(response.id).removeprefix("resp_")

    with env.client() as client:
        holder = client.chat.completions.create(
            model="one-slot", messages=hello, max_tokens=1000, stream=True
        )
        next(iter(holder))
        queued = []
        for name in "abcd":
            response = client.responses.create(
                model="one-slot", input=name, background=True, max_output_tokens=3
            )
            assert response.status == "queued"
            _first_event(env.queen, job_of(response), "infer_schedule")  # in the queue
            queued.append(response)
        with pytest.raises(openai.RateLimitError):  # waits 1 s, behind them
            client.chat.completions.create(model="one-slot", messages=hello)
        assert [client.responses.retrieve(r.id).status for r in queued] == ["queued"] * 4
        dropped = queued.pop(2)
        assert client.responses.cancel(dropped.id).status == "cancelled"
        assert client.responses.cancel(dropped.id).status == "cancelled"
        holder.close()
        for response in queued:
            _wait_state(env.queen, job_of(response), {"completed"})
        scheduled = [
            _epoch(_first_event(env.queen, job_of(r), "infer_worker")["ts"]) for r in queued
        ]
        assert scheduled == sorted(scheduled)
        assert [client.responses.retrieve(r.id).status for r in queued] == ["incomplete"] * 3
        events = list(client.responses.retrieve(queued[0].id, stream=True))
    assert [e.type for e in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert events[0].response.status == "queued"  # type: ignore[union-attr]
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers)) and numbers[1] > 3  # after the job's forward
    actions = {e["action"] for e in _events(env.queen, job_of(dropped))}
    assert "infer_schedule" in actions and "infer_worker" not in actions
    assert _job(env, job_of(dropped))["state"] == "cancelled"


def test_tools_are_refused_by_name_on_chat_and_responses(env: Env) -> None:
    """No backend calls tools: a request asking for one is a 400 naming the parameter,
    not a completion that silently ignored it; ``tool_choice`` "none"/"auto" alone pass."""
    hello = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    forced = {"type": "function", "function": {"name": "f"}}
    chat: list[tuple[dict[str, Any], str]] = [
        ({"tools": [tool]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": forced}, "tool_choice"),
        ({"functions": [tool["function"]]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
    ]
    responses: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]
    with env.client() as client:
        calls: list[tuple[Callable[[], Any], str]] = [
            (partial(client.chat.completions.create, model="tiny", messages=hello, **extra), p)
            for extra, p in chat
        ]
        calls += [
            (partial(client.responses.create, model="tiny", input="x", **extra), p)
            for extra, p in responses
        ]
        for call, param in calls:
            with pytest.raises(openai.BadRequestError) as info:
                call()
            error = _error(info.value)
            assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
            assert "tools are not supported by this server" in error["message"]
        done = client.chat.completions.create(
            model="tiny", messages=hello, max_tokens=2, tools=[], tool_choice="none"
        )
        assert done.choices[0].finish_reason == "length"
        response = client.responses.create(
            model="tiny", input="x", max_output_tokens=2, tool_choice="auto"
        )
        assert response.status == "incomplete"


def test_a_failure_after_the_stream_started_is_an_error_object_and_no_done(env: Env) -> None:
    """The job is cancelled through /v1/jobs mid-stream: the stream ends with an error
    object and no [DONE]; the SDK raises APIError from it."""
    body = {
        "model": "slow",
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 500,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.Client(headers=_headers(), timeout=10) as http:
        with http.stream("POST", f"{env.base}/chat/completions", json=body) as r:
            job_id = r.headers["X-Job-Id"]
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:
                    cancel = http.delete(f"{env.queen}/v1/jobs/{job_id}")
                    assert cancel.status_code == 200, cancel.text
    assert "data: [DONE]" not in lines
    last = json.loads(lines[-1][6:])
    assert last["error"]["code"] == "cancelled"
    assert set(last["error"]) == {"message", "type", "param", "code"}
    # The SDK turns it into an exception.
    with env.client() as client:
        stream = client.chat.completions.create(
            model="slow", messages=body["messages"], max_tokens=500, stream=True
        )
        with pytest.raises(openai.APIError, match="cancelled"):  # noqa: PT012
            for chunk in stream:
                job = chunk.id.removeprefix("chatcmpl-")
                httpx.delete(f"{env.queen}/v1/jobs/{job}", headers=_headers())


# ---- cancel by closing ------------------------------------------------------------------------


def test_closing_the_stream_cancels_the_job_and_the_workers_generation(env: Env) -> None:
    with env.client() as client:
        stream = client.chat.completions.create(
            model="slow",
            messages=[{"role": "user", "content": "go on"}],
            max_tokens=2000,
            stream=True,
        )
        job_id = ""
        for n, chunk in enumerate(stream):
            job_id = chunk.id.removeprefix("chatcmpl-")
            if n == 3:
                break
        stream.close()
        closed_at = time.time()
    queen_record = _wait_state(env.queen, job_id, {"cancelled"})
    worker_url, remote = _remote_job(env, job_id)
    worker_record = _wait_state(worker_url, remote, {"cancelled"})
    ended_ms = (_epoch(worker_record["finished_at"]) - closed_at) * 1000
    print(f"\nclient close -> worker job ended: {ended_ms:.1f} ms")
    assert ended_ms < 2000
    assert queen_record["state"] == "cancelled"
    tokens = [e for e in _events(worker_url, remote) if e["action"] == "token"]
    assert len(tokens) < 200  # the generation stopped, far before its 2000 tokens


def test_closing_a_foreground_responses_stream_cancels_it(env: Env) -> None:
    with env.client() as client:
        stream = client.responses.create(
            model="slow", input="stop me", max_output_tokens=2000, stream=True
        )
        for event in stream:
            if event.type == "response.output_text.delta":
                break
        stream.close()
        response_id = event.item_id.replace("msg_", "resp_", 1)  # type: ignore[union-attr]
        job_id = response_id.removeprefix("resp_")
        assert _wait_state(env.queen, job_id, {"cancelled"})["state"] == "cancelled"
        assert client.responses.retrieve(response_id).status == "cancelled"
    worker_url, remote = _remote_job(env, job_id)
    assert _wait_state(worker_url, remote, {"cancelled"})["state"] == "cancelled"


# ---- the Responses API -------------------------------------------------------------------------


def test_responses_create_sync_and_streamed(env: Env) -> None:
    with env.client() as client:
        response = client.responses.create(
            model="tiny", input="tell me", instructions="short", max_output_tokens=8
        )
        assert response.id.startswith("resp_job-")
        assert response.status == "incomplete"  # the tiny model always hits max_output_tokens
        assert response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens"
        prompt = render_messages([{"content": "short"}, {"content": "tell me"}])
        assert response.output_text == _expected("tiny", prompt, 8)
        assert response.usage is not None
        assert response.usage.output_tokens == 8
        again = client.responses.retrieve(response.id)
        assert again.output_text == response.output_text
        assert again.status == "incomplete"
        events = list(
            client.responses.create(model="tiny", input="tell me", max_output_tokens=4, stream=True)
        )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == _expected("tiny", "tell me", 4)
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(set(numbers))
    assert numbers[0] == 0


def test_background_response_resumes_after_a_forced_disconnect(env: Env) -> None:
    with env.client() as client:
        stream = client.responses.create(
            model="slow", input="resume me", max_output_tokens=30, background=True, stream=True
        )
        seen = []
        for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta" and len(seen) > 8:
                break
        stream.response.close()  # the connection drops; a background response goes on
        response_id = seen[0].response.id  # type: ignore[union-attr]
        after = seen[-1].sequence_number
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=after))
        assert rest[0].sequence_number > after
        assert rest[-1].type == "response.incomplete"
        text = "".join(e.delta for e in [*seen, *rest] if e.type == "response.output_text.delta")
        assert text == _expected("slow", "resume me", 30)
        assert client.responses.retrieve(response_id).output_text == text
        # The whole stream again from the store, and the same tail from the same point.
        whole = list(client.responses.retrieve(response_id, stream=True))
        assert [e.sequence_number for e in whole if e.sequence_number > after] == [
            e.sequence_number for e in rest
        ]


def test_background_response_cancel_is_idempotent_and_stops_the_worker(env: Env) -> None:
    with env.client() as client:
        response = client.responses.create(
            model="slow", input="cancel me", max_output_tokens=2000, background=True
        )
        assert response.status in ("queued", "in_progress")
        assert response.background is True
        job_id = response.id.removeprefix("resp_")
        _first_event(env.queen, job_id, "token")  # generating on the worker
        cancelled = client.responses.cancel(response.id)
        assert cancelled.status == "cancelled"
        assert client.responses.cancel(response.id).status == "cancelled"
        assert client.responses.retrieve(response.id).status == "cancelled"
        events = list(client.responses.retrieve(response.id, stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "cancelled"  # type: ignore[union-attr]
    worker_url, remote = _remote_job(env, job_id)
    assert _wait_state(worker_url, remote, {"cancelled"})["state"] == "cancelled"


def test_a_foreground_response_cannot_be_cancelled(env: Env) -> None:
    """As OpenAI answers: 400, and the response is left as it was."""
    with env.client() as client:
        response = client.responses.create(model="tiny", input="done", max_output_tokens=3)
        assert response.status == "incomplete"
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.cancel(response.id)
        assert _error(info.value)["message"] == "Only background responses can be cancelled."
        assert client.responses.retrieve(response.id).status == "incomplete"


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 3, 5, 8, 12, 20, 30, 60])
async def test_a_job_cancelled_during_its_forward_leaves_no_worker_job(
    env: Env, delay_ms: int
) -> None:
    """A queen job cancelled while (or just before, or after) its forward request to the
    worker is in flight: the worker job it created (one-call POST, on_disconnect: cancel)
    does not go on running. Run at several delays to cross the request's window."""
    worker = env.slow_worker["url"]
    body = {"operation": "infer", "model": "slow", "prompt": "orphan?", "max_tokens": 500}
    with trio.fail_after(10):
        async with JobClient(env.queen, token=TOKEN) as client:
            job_id = await client.submit(body)
            await trio.sleep(delay_ms / 1000)
            await client.cancel(job_id)
            assert (await client.get(job_id))["state"] == "cancelled"
        deadline = trio.current_time() + 1.0
        while left := await running_jobs(worker, TOKEN):
            assert trio.current_time() < deadline, left
            await trio.sleep(0.02)


# ---- other clients and the OpenAI-backend worker -----------------------------------------------


def test_openai_backend_worker_passes_the_chat_through_to_its_upstream(env: Env) -> None:
    messages = [
        {"role": "system", "content": "you relay"},
        {"role": "user", "content": "through the chain"},
    ]
    expected = _expected("chain", render_messages(messages), 9)
    with env.client() as client:
        answer = client.chat.completions.create(model="chain", messages=messages, max_tokens=9)
        assert answer.choices[0].message.content == expected
        streamed = client.chat.completions.create(
            model="chain", messages=messages, max_tokens=9, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    job_id = answer.id.removeprefix("chatcmpl-")
    worker_url, remote = _remote_job(env, job_id)
    assert worker_url == env.chain_worker["url"]
    start = next(e for e in _events(worker_url, remote) if e["action"] == "infer_start")
    assert start["backend"] == "openai"


def test_langchain_chat_openai_invoke_and_stream(env: Env) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=env.base, api_key=TOKEN, model="tiny", max_tokens=6, max_retries=0)  # type: ignore[call-arg]
    answer = llm.invoke("hello langchain")
    assert answer.content == _expected("tiny", "hello langchain", 6)
    assert answer.response_metadata["finish_reason"] == "length"
    chunks = list(llm.stream("hello langchain"))
    assert "".join(str(c.content) for c in chunks) == answer.content
    bad = ChatOpenAI(base_url=env.base, api_key="wrong", model="tiny", max_retries=0)  # type: ignore[call-arg]
    with pytest.raises(openai.AuthenticationError):
        bad.invoke("x")


def test_a_background_response_ends_failed_at_the_servers_time_limit(tmp_path: Path) -> None:
    """``--background-timeout`` bounds a background response (its job's timeout): one that
    would generate for 100 s ends ``failed`` after 0.5 s, keeping what it generated, with
    an error that says why; the worker's job stops with it. A foreground response (its
    client waits, and cancels it by leaving) is not bound by it. Its own small cluster: a
    queen (memory store) and a standalone worker that heartbeats to it."""
    cluster = Cluster(tmp_path)
    try:
        queen = cluster.start(
            "queen",
            [
                *("queen", "--port", "0", "--store", "memory", "--background-timeout", "0.5"),
                *("--heartbeat-ttl", "2", "--hive", f"localhost=http://127.0.0.1:{closed_port()}"),
            ],
        )
        worker = cluster.start(
            "worker",
            [
                *("worker", "--port", "0", "--model", "bounded", "--queen", queen),
                *("--token-delay", "0.05", "--heartbeat-s", "0.2", "--max-concurrent", "2"),
            ],
        )
        with openai.OpenAI(base_url=queen + "/v1", api_key="unused", max_retries=0) as client:
            _wait_for_model(client, "bounded")
            started = time.monotonic()
            response = client.responses.create(
                model="bounded", input="x", max_output_tokens=2000, background=True
            )
            record = _wait_state(queen, response.id.removeprefix("resp_"), {"failed"})
            assert 0.5 <= time.monotonic() - started < 5
            assert (record["timeout_s"], record["error"]) == (0.5, "Job timed out after 0.5s")
            final = client.responses.retrieve(response.id)
            assert final.status == "failed" and final.error is not None
            assert final.error.code == "server_error"
            assert final.error.message == (
                "The response did not finish within 0.5s, this server's limit for "
                "background responses (background_timeout_s)"
            )
            assert final.usage is not None and 0 < final.usage.output_tokens < 20
            assert final.output_text == _expected("bounded", "x", final.usage.output_tokens)
            assert final.output[0].status == "incomplete"  # type: ignore[union-attr]
            events = list(client.responses.retrieve(response.id, stream=True))
            assert events[-1].type == "response.failed"
            assert events[-1].response.error == final.error  # type: ignore[union-attr]
            trio.run(partial(wait_idle, worker, within_s=5))
            foreground = client.responses.create(model="bounded", input="x", max_output_tokens=20)
            assert foreground.status == "incomplete"  # 1 s of tokens, past the bound
    finally:
        cluster.close()


def test_a_background_responses_bound_counts_from_its_creation_across_a_restart(
    tmp_path: Path,
) -> None:
    """The bound of a background response ends at its creation plus
    ``--background-timeout`` (4 s), not that long after the attempt that runs it: one
    still queued (the queen runs one job at once) when the queen restarts starts on the
    restarted queen about 3 s after its creation and fails 1 s later, not 4 s later.
    Its own small cluster: a queen (SQLite store, a fixed port) and a standalone worker
    that heartbeats to it."""
    cluster = Cluster(tmp_path)
    port = closed_port()
    argv = [
        *("queen", "--port", str(port), "--store", f"sqlite:{tmp_path / 'queen.db'}"),
        *("--max-concurrent", "1", "--background-timeout", "4", "--heartbeat-ttl", "2"),
        *("--hive", f"localhost=http://127.0.0.1:{closed_port()}"),
    ]
    try:
        queen = cluster.start("queen", argv)
        worker = cluster.start(
            "worker",
            [
                *("worker", "--port", "0", "--model", "bounded", "--queen", queen),
                *("--token-delay", "0.05", "--heartbeat-s", "0.2", "--max-concurrent", "1"),
            ],
        )

        with openai.OpenAI(base_url=queen + "/v1", api_key="unused", max_retries=0) as client:
            _wait_for_model(client, "bounded")
            first = client.responses.create(
                model="bounded", input="first", max_output_tokens=2000, background=True
            )
            _first_event(queen, first.id.removeprefix("resp_"), "token")
            second = client.responses.create(
                model="bounded", input="second", max_output_tokens=2000, background=True
            )
            job_id = second.id.removeprefix("resp_")
            time.sleep(1.5)
            assert _job_at(queen, job_id)["state"] == "queued"
            proc = cluster.proc("queen")
            proc.terminate()
            assert proc.wait(15) == 0
            trio.run(partial(wait_idle, worker, within_s=5))  # the first one's job ended
            queen = cluster.start("queen-again", argv)
            _wait_for_model(client, "bounded")
            record = _wait_state(queen, job_id, {"failed"})
            final = client.responses.retrieve(second.id)
        created, started, finished = (
            _epoch(record[k]) for k in ("created_at", "started_at", "finished_at")
        )
        assert started - created > 1.5  # waited for the queen's restart
        # The bound from its creation; from its start it would end 4 s after ``started``.
        assert 4 <= finished - created < started - created + 3.5
        assert record["error"] == "Job timed out after 4s"
        assert final.status == "failed" and final.error is not None
        assert final.error.message.startswith("The response did not finish within 4s")
        assert final.usage is not None and 0 < final.usage.output_tokens < 40
    finally:
        cluster.close()


# ---- durability: a queen restart (keep last: it restarts the module's queen) -----------------


def test_background_response_survives_a_queen_restart(env: Env) -> None:
    with env.client() as client:
        response = client.responses.create(
            model="tiny", input="durable", max_output_tokens=12, background=True
        )
        job_id = response.id.removeprefix("resp_")
        _wait_state(env.queen, job_id, {"completed"})
        before = list(client.responses.retrieve(response.id, stream=True))
        text = client.responses.retrieve(response.id).output_text
    assert text == _expected("tiny", "durable", 12)
    proc = env.cluster.proc("queen")
    proc.terminate()
    assert proc.wait(15) == 0
    _restart_queen(env, "queen-again")
    with env.client() as client:
        again = client.responses.retrieve(response.id)
        assert again.status == "incomplete"
        assert again.output_text == text
        middle = before[len(before) // 2].sequence_number
        rest = list(client.responses.retrieve(response.id, stream=True, starting_after=middle))
    assert [e.model_dump() for e in rest] == [
        e.model_dump() for e in before if e.sequence_number > middle
    ]


def test_background_response_of_a_killed_queen_resumes_to_its_failure(env: Env) -> None:
    """SIGKILL while generating: the restarted queen recovers the job as failed
    (``interrupted``); resuming from a seen sequence number gives the rest of what was
    stored and then ``response.failed``; the worker's job was cancelled with the stream."""
    with env.client() as client:
        stream = client.responses.create(
            model="slow", input="crash", max_output_tokens=2000, background=True, stream=True
        )
        seen = []
        for event in stream:
            seen.append(event)
            if len(seen) == 12:
                break
        assert seen[-1].type == "response.output_text.delta"
        response_id = seen[0].response.id  # type: ignore[union-attr]
        job_id = response_id.removeprefix("resp_")
        worker_url, remote = _remote_job(env, job_id)
        name = env.cluster.procs[-1][0]
        env.cluster.kill(name)
        stream.response.close()
    assert _wait_state(worker_url, remote, {"cancelled"})["state"] == "cancelled"
    _restart_queen(env, f"{name}-after-kill")
    with env.client() as client:
        after = seen[-1].sequence_number
        rest = list(client.responses.retrieve(response_id, stream=True, starting_after=after))
        final = client.responses.retrieve(response_id)
    assert all(e.sequence_number > after for e in rest)
    assert rest[-1].type == "response.failed"
    assert final.status == "failed"
    assert final.error is not None
    assert "interrupted" in final.error.message
    deltas = [e.delta for e in [*seen, *rest] if e.type == "response.output_text.delta"]
    assert "".join(deltas) == _expected("slow", "crash", len(deltas))


async def test_no_job_is_left_running(env: Env) -> None:
    await wait_idle(env.queen, env.hive, within_s=10, token=TOKEN)


@pytest.mark.parametrize("token", ["plain", ' "quoted"\n', "ünï\u2028code", "\x00nul\\", ""])
def test_frame_template_writes_the_same_bytes_as_sse_frame(token: str) -> None:
    chunk = chat_chunk("chatcmpl-job-1", 1, "m", {"content": PLACEHOLDER}, with_usage=True)
    same = chat_chunk("chatcmpl-job-1", 1, "m", {"content": token}, with_usage=True)
    assert frame_template(chunk)(token) == sse_frame(same)
    assert json.loads(sse_frame(same)[6:])["choices"][0]["delta"]["content"] == token


async def test_the_openai_routes_leave_the_cancel_fast_path_on() -> None:
    """The OpenAI API and the dashboard add no Quart hook or error handler: the job API's
    ASGI fast path still answers every job route on a queen that serves them, and the
    OpenAI ``POST`` routes too."""
    from servers.queen._config import QueenConfig
    from servers.queen._openai import add_openai_routes
    from servers.queen._server import Queen, add_ui_routes, parse_queen_payload
    from trio_jobs import JobRegistry
    from trio_jobs.http import create_app
    from trio_jobs.http._asgi import JobRoutes

    async with trio.open_nursery() as nursery:
        registry = JobRegistry(actor="queen")
        queen = Queen(QueenConfig(), registry, nursery)
        app = create_app(registry, queen.execute, name="queen", parse_payload=parse_queen_payload)
        queen.add_routes(app)
        add_ui_routes(app, hive_health=queen.hive_health)
        add_openai_routes(app, queen)
        layer: Any = app.asgi_app
        for _ in range(10):  # down the middleware chain (each holds the next)
            if layer is None or isinstance(layer, JobRoutes):
                break
            layer = getattr(layer, "inner", None) or getattr(layer, "app", None)
        assert layer is not None, "no fast path in the queen's middleware chain"
        assert layer.routes() == {
            *("submit", "stream", "record", "cancel"),
            *("POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses"),
        }
        nursery.cancel_scope.cancel()
