"""JobClient without a network: SSE decoding, outcomes, error mapping and reconnects.

Every test drives the client through ``httpx.MockTransport``; the handlers answer the wire
contract's status codes and SSE bodies (streamed, possibly ending without a signal or
breaking mid-body). Time-dependent tests run on ``autojump_clock`` and assert exact virtual
time. Streaming against a real server is in ``test_client_sockets.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_jobs import (
    HTTPStatusError,
    InvalidJobState,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NarrationEvent,
    Priority,
    RetryPolicy,
    Signal,
    StreamEndedWithoutSignal,
    TerminalSignal,
    TransportError,
    timeout_message,
)
from trio_jobs._client import JobClient, raise_for_signal
from trio_jobs._client._sse_decoder import SSEDecoder, SSEMessage

JOB = "job-0001"
BASE = "http://jobs.test"


def event(n: int, job_id: str = JOB, **fields: Any) -> str:
    return NarrationEvent(n, job_id, 1_700_000_000.5 + n, "hive", "step", f"step {n}", fields).wire


def frame(n: int | None, data: str) -> bytes:
    head = f"id: {n}\n" if n is not None else ""
    return f"{head}data: {data}\n\n".encode()


def sse_body(n_events: int, signal: str | None = "[DONE]", *, first: int = 1) -> list[bytes]:
    chunks = [b"retry: 2000\n\n"]
    chunks += [frame(i, event(i)) for i in range(first, n_events + 1)]
    if signal is not None:
        chunks.append(frame(n_events + 1, signal))
    return chunks


class Body(httpx.AsyncByteStream):
    """A streamed response body: the chunks, then optionally an error instead of the end."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.sent = 0
        self.finished = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if self.closed:
                raise httpx.ReadError("connection closed")  # as a closed socket would
            self.sent += 1
            yield chunk
            await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        self.finished = True

    async def aclose(self) -> None:
        self.closed = True


SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}


def sse_response(body: Body, **headers: str) -> httpx.Response:
    return httpx.Response(200, headers={**SSE_HEADERS, **headers}, stream=body)


def client_for(
    handler: Callable[[httpx.Request], Any], **kwargs: Any
) -> tuple[JobClient, list[httpx.Request]]:
    """A client whose requests go to ``handler``; the list records every request."""
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        result = handler(request)
        if isinstance(result, BaseException):
            raise result
        assert isinstance(result, httpx.Response)
        return result

    return JobClient(BASE, transport=httpx.MockTransport(record), **kwargs), seen


async def collect_into(channel: trio.abc.ReceiveChannel[Any], out: list[Any]) -> None:
    async for item in channel:
        out.append(item)


def error(status: int, name: str, detail: Any = None) -> httpx.Response:
    return httpx.Response(status, json={"error": name, "detail": detail})


# -- the SSE decoder ---------------------------------------------------------------------

STREAM = (
    "\ufeffretry: 2000\n\n"
    ": keep-alive\n\n"
    'id: 1\ndata: {"a": "é€"}\n\n'
    "id: 2\r\ndata: line one\r\ndata: line two\r\n\r\n"
    "id: 3\rdata:no-space\r\r"
    "event: custom\nid\ndata\n\n"
    "id: 4\n\n"
    "id: 5\x00\ndata: [DONE]\n\n"
).encode()

EXPECTED = [
    SSEMessage('{"a": "é€"}', "1"),
    SSEMessage("line one\nline two", "2"),
    SSEMessage("no-space", "3"),
    SSEMessage("[DONE]", "4"),
]


def test_sse_decoder_whole_stream() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(STREAM) == EXPECTED
    assert decoder.retry == 2000
    assert decoder.last_event_id == "4"  # an id with a NUL is ignored
    assert decoder.close() is False


def test_sse_decoder_any_split_gives_the_same_messages() -> None:
    """Every split point, including inside UTF-8 sequences and between CR and LF."""
    for cut in range(len(STREAM) + 1):
        for second in (cut, min(len(STREAM), cut + 3)):
            decoder = SSEDecoder()
            got = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:second])
            got += decoder.feed(STREAM[second:])
            assert got == EXPECTED, (cut, second)


_FIELD = st.sampled_from(["data", "id", "event", "retry", "", "dat", "x"])
_VALUE = st.text(alphabet=" :ab1é\x00{}[]", max_size=6)
_LINE = st.one_of(
    st.just(""),
    st.tuples(_FIELD, st.sampled_from(["", ":", ": "]), _VALUE).map("".join),
)


@given(
    lines=st.lists(_LINE, max_size=25),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4),
)
def test_sse_decoder_agrees_with_httpx_sse(lines: list[str], newline: str, cuts: list[int]) -> None:
    """Same messages as httpx-sse for any input, split anywhere (httpx-sse also emits
    blocks with empty data, which the spec does not dispatch: those are left out)."""
    from httpx_sse import EventSource

    raw = "".join(line + newline for line in lines).encode()
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    theirs = [(e.data, e.id or None, e.event) for e in EventSource(response).iter_sse()]
    decoder = SSEDecoder()
    ours: list[SSEMessage] = []
    start = 0
    for cut in [*sorted(cuts), len(raw)]:
        ours += decoder.feed(raw[start:cut])
        start = max(start, cut)
    assert [(m.data, m.id or None, m.event) for m in ours] == [t for t in theirs if t[0]]


def test_sse_decoder_incomplete_tail_and_ids() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\ndata: x\n\nid: 8\ndata: partial") == [SSEMessage("x", "7")]
    # id 8's block never completed: it is not the last event id, and close() reports it.
    assert decoder.last_event_id == "7"
    assert decoder.close() is True


def test_sse_decoder_bad_retry_is_ignored() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: 12x\n\nretry: -5\n\n") == []
    assert decoder.retry is None


# -- submit and plain requests ------------------------------------------------------------


async def test_submit_sends_operation_and_options() -> None:
    client, seen = client_for(lambda r: httpx.Response(201, json={"job_id": JOB}))
    async with client:
        job_id = await client.submit(
            {"operation": "status", "verbose": True},
            timeout_s=2.5,
            priority=Priority.HIGH,
            retry=RetryPolicy(max_attempts=2, backoff_base=0.5),
            tags={"team": "a"},
            metadata={"k": [1, 2]},
            on_disconnect="cancel",
        )
    assert job_id == JOB
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert json.loads(request.content) == {
        "operation": "status",
        "verbose": True,
        "timeout_s": 2.5,
        "priority": "high",
        "retry": RetryPolicy(max_attempts=2, backoff_base=0.5).to_dict(),
        "tags": {"team": "a"},
        "metadata": {"k": [1, 2]},
        "on_disconnect": "cancel",
    }
    assert "authorization" not in request.headers


async def test_submit_dumps_a_pydantic_model_and_sends_the_token() -> None:
    from pydantic import BaseModel

    class Infer(BaseModel):
        operation: str = "infer"
        prompt: str
        temperature: float = 0.7

    client, seen = client_for(lambda r: httpx.Response(201, json={"job_id": JOB}), token="s3")
    async with client:
        await client.submit(Infer(prompt="hi"), priority="low")
    assert json.loads(seen[0].content) == {
        "operation": "infer",
        "prompt": "hi",
        "temperature": 0.7,
        "priority": "low",
    }
    assert seen[0].headers["authorization"] == "Bearer s3"


async def test_submit_rejects_unknown_and_clashing_options() -> None:
    client, seen = client_for(lambda r: httpx.Response(201, json={"job_id": JOB}))
    async with client:
        with pytest.raises(TypeError, match="unknown job option"):
            await client.submit({"n": 1}, timeout=3)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="timeout_s"):
            await client.submit({"timeout_s": 1}, timeout_s=2)
        with pytest.raises(TypeError, match="mapping or a pydantic model"):
            await client.submit(["not", "an", "op"])  # type: ignore[arg-type]
    assert seen == []


async def test_get_list_cancel_health_history() -> None:
    record = {"job_id": JOB, "state": "running"}

    def handler(request: httpx.Request) -> httpx.Response:
        route = (request.method, request.url.path)
        if route == ("GET", f"/v1/jobs/{JOB}"):
            return httpx.Response(200, json=record)
        if route == ("GET", "/v1/jobs"):
            return httpx.Response(200, json={"jobs": [record, dict(request.url.params)]})
        if route == ("DELETE", f"/v1/jobs/{JOB}"):
            return httpx.Response(200, json={**record, "state": "cancelled"})
        if route == ("GET", f"/v1/jobs/{JOB}/history"):
            return httpx.Response(200, json={"history": [{"state": "queued"}]})
        if route == ("GET", "/health"):
            return httpx.Response(200, json={"status": "ok"})
        return error(404, "not found")

    client, _ = client_for(handler)
    async with client:
        assert await client.get(JOB) == record
        jobs = await client.list_jobs(state="running", tag="team:a")
        assert jobs == [record, {"state": "running", "tag": "team:a"}]
        assert (await client.cancel(JOB))["state"] == "cancelled"
        assert await client.history(JOB) == [{"state": "queued"}]
        assert await client.health() == {"status": "ok"}


# -- error mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected", "check"),
    [
        (error(404, "unknown job", JOB), JobNotFound, lambda e: e.job_id == JOB),
        (error(409, "job finished", "completed"), InvalidJobState, lambda e: "finished" in str(e)),
        (
            error(422, "invalid field", [{"loc": ["timeout_s"]}]),
            HTTPStatusError,
            lambda e: (
                (e.status_code, e.error, e.detail)
                == (422, "invalid field", [{"loc": ["timeout_s"]}])
            ),
        ),
        (
            error(401, "unauthorized"),
            HTTPStatusError,
            lambda e: (e.status_code, e.error) == (401, "unauthorized"),
        ),
        (
            httpx.Response(502, text="<html>bad gateway</html>"),
            HTTPStatusError,
            lambda e: e.status_code == 502 and "bad gateway" in str(e.detail),
        ),
        (
            httpx.Response(200, text="not json"),
            TransportError,
            lambda e: "not JSON" in str(e),
        ),
        (
            httpx.Response(200, json={"unexpected": 1}),
            TransportError,
            lambda e: "no 'history'" in str(e),
        ),
        (httpx.ConnectError("refused"), TransportError, lambda e: "ConnectError" in str(e)),
        (httpx.ReadTimeout("slow"), TransportError, lambda e: "timed out" in str(e)),
        (httpx.RemoteProtocolError("cut"), TransportError, lambda e: "cut" in str(e)),
        (httpx.DecodingError("bad gzip"), TransportError, lambda e: "DecodingError" in str(e)),
        (httpx.StreamClosed(), TransportError, lambda e: "StreamClosed" in str(e)),
    ],
)
async def test_error_mapping(
    response: httpx.Response | Exception, expected: type[Exception], check: Callable[[Any], bool]
) -> None:
    client, _ = client_for(lambda r: response)
    async with client:
        with pytest.raises(expected) as info:
            await client.history(JOB)
    assert check(info.value), info.value
    if isinstance(response, Exception):
        assert info.value.__cause__ is response


async def test_cancel_404_and_409() -> None:
    answers = iter([error(404, "unknown job"), error(409, "job finished", "completed")])
    client, _ = client_for(lambda r: next(answers))
    async with client:
        with pytest.raises(JobNotFound):
            await client.cancel(JOB)
        with pytest.raises(InvalidJobState):
            await client.cancel(JOB)


async def test_http_status_error_without_job_is_not_job_not_found() -> None:
    client, _ = client_for(lambda r: error(404, "no route"))
    async with client:
        with pytest.raises(HTTPStatusError) as info:
            await client.health()
    assert info.value.status_code == 404


# -- outcomes -------------------------------------------------------------------------------


def test_raise_for_signal() -> None:
    raise_for_signal(TerminalSignal(Signal.DONE), JOB)
    with pytest.raises(JobFailed, match="boom") as failed:
        raise_for_signal(TerminalSignal(Signal.ERROR, "boom"), JOB)
    assert type(failed.value) is JobFailed
    assert failed.value.job_id == JOB
    with pytest.raises(JobTimeout) as timed_out:
        raise_for_signal(TerminalSignal(Signal.ERROR, timeout_message(2.5)), JOB)
    assert timed_out.value.message == "Job timed out after 2.5s"
    with pytest.raises(JobCancelled):
        raise_for_signal(TerminalSignal(Signal.CANCELLED), JOB)
    with pytest.raises(StreamEndedWithoutSignal):
        raise_for_signal(None, JOB)
    # A failure message that only mentions a timeout is still a plain failure.
    with pytest.raises(JobFailed) as other:
        raise_for_signal(TerminalSignal(Signal.ERROR, "upstream: Job timed out after 1s"))
    assert type(other.value) is JobFailed


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        ("[DONE]", None),
        ("[ERROR] disk full", JobFailed),
        (f"[ERROR] {timeout_message(3)}", JobTimeout),
        ("[CANCELLED]", JobCancelled),
        (None, StreamEndedWithoutSignal),
    ],
)
async def test_wait_outcomes(signal: str | None, expected: type[Exception] | None) -> None:
    bodies: list[Body] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v1/jobs/{JOB}/stream"
        assert request.headers["accept"] == "text/event-stream"
        # Streams have no read timeout (a job may stay quiet for long).
        assert request.extensions["timeout"]["read"] is None
        bodies.append(Body(sse_body(3, signal)))
        return sse_response(bodies[-1])

    client, seen = client_for(handler, max_reconnects=0)
    async with client:
        if expected is None:
            await client.wait(JOB)
        else:
            with pytest.raises(expected) as info:
                await client.wait(JOB)
            if expected is JobFailed:
                assert info.value.message == "disk full"  # type: ignore[attr-defined]
    assert len(seen) == 1
    (body,) = bodies
    assert body.finished and body.closed  # read to the end of the body, then released


async def test_stream_items_and_lines() -> None:
    chunks = [b"retry: 2000\n\n", frame(None, "[START]") + frame(1, event(1, progress=0.5))]
    chunks += [frame(2, event(2)) + b": keep-alive\n\n" + frame(3, "[ERROR] bad input")]
    client, _ = client_for(lambda r: sse_response(Body(chunks)))
    async with client:
        async with client.stream(JOB) as events:
            first = await events.receive()
            assert isinstance(first, NarrationEvent)
            assert (first.id, first.job_id, first.actor, first.action) == (1, JOB, "hive", "step")
            assert first.ts == 1_700_000_001.5
            assert first.fields == {"progress": 0.5}
            assert first.wire == event(1, progress=0.5)
            assert await events.lines().receive() == event(2)  # same position, raw line
            terminal = await events.receive()
            assert terminal == TerminalSignal(Signal.ERROR, "bad input", 3)
            with pytest.raises(trio.EndOfChannel):
                await events.receive()
            with pytest.raises(JobFailed, match="bad input"):
                events.check()
        async with client.stream(JOB) as events:
            lines = [line async for line in events.lines()]
        assert lines == ["[START]", event(1, progress=0.5), event(2), "[ERROR] bad input"]
        assert events.retry_ms == 2000
        assert events.last_event_id == "3"


async def test_receive_is_a_checkpoint() -> None:
    client, _ = client_for(lambda r: sse_response(Body([b"".join(sse_body(2))])))
    async with client, client.stream(JOB) as events:
        await events.receive()
        with trio.testing.assert_checkpoints():
            await events.receive()  # already buffered: still a checkpoint
        assert isinstance(events.receive_nowait(), TerminalSignal)
        with pytest.raises(trio.WouldBlock):
            events.receive_nowait()  # the end of the body has not been read yet
        with pytest.raises(trio.EndOfChannel):
            await events.receive()
        with pytest.raises(trio.EndOfChannel):
            events.receive_nowait()


async def test_batch_fast_path() -> None:
    """wait_ready + receive_batch: whole network chunks at once, then an empty batch."""
    body = b"".join(sse_body(3)[:3]), b"".join(sse_body(3)[3:])
    chunks = [body[0], frame(None, "[START]"), body[1]]
    client, _ = client_for(lambda r: sse_response(Body(chunks)))
    batches: list[list[Any]] = []
    async with client, client.stream(JOB) as events:
        while True:
            await events.wait_ready()
            batch = events.receive_batch()
            if not batch:
                break
            batches.append(batch)
        with pytest.raises(trio.EndOfChannel):
            await events.receive()
    assert [[item.id for item in batch] for batch in batches] == [[1, 2], [3, 4]]


async def test_garbage_and_data_after_signal_are_errors() -> None:
    bodies = iter(
        [
            Body([frame(1, "not json")]),
            Body([frame(1, "[DONE]"), frame(2, event(2))]),
        ]
    )
    client, _ = client_for(lambda r: sse_response(next(bodies)))
    async with client:
        with pytest.raises(TransportError, match="not an event or a signal"):
            await client.wait(JOB)
        with pytest.raises(TransportError, match="after the terminal signal"):
            await client.wait(JOB)


GZIP = {"content-encoding": "gzip"}
# httpx's aiter_bytes() lets a DecodingError out of its ``async for`` over aiter_raw(),
# leaving that generator, and the transport's body generators under it, to the garbage
# collector (trio reports each); nothing of ours holds them, so the two decoding tests
# ignore exactly those reports.
HTTPX_DECODE_LEAK = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object "
    "(Response.aiter_raw|BoundAsyncStream.__aiter__|Body.__aiter__) "
    ":pytest.PytestUnraisableExceptionWarning"
)


@HTTPX_DECODE_LEAK
async def test_a_body_that_fails_to_decode_is_a_transport_error() -> None:
    """``Content-Encoding: gzip`` over a plain body: httpx's DecodingError is mapped, and
    not retried (a reconnect would read the same bytes)."""
    client, seen = client_for(lambda r: sse_response(Body(sse_body(2)), **GZIP))
    async with client:
        with pytest.raises(TransportError, match="DecodingError") as info:
            await client.wait(JOB)
    assert isinstance(info.value.__cause__, httpx.DecodingError)
    assert len(seen) == 1


@HTTPX_DECODE_LEAK
async def test_an_undecodable_answer_to_a_reconnect_is_a_transport_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answers = iter(
        [
            sse_response(Body([frame(1, event(1))], httpx.ReadError("reset"))),
            httpx.Response(503, headers=GZIP, stream=Body([b"not gzip at all"])),
        ]
    )
    client, seen = client_for(lambda r: next(answers))
    got: list[Any] = []
    async with client, client.stream(JOB) as events:
        with pytest.raises(TransportError, match="DecodingError") as info:
            await collect_into(events, got)
    assert isinstance(info.value.__cause__, httpx.DecodingError)
    assert [i.id for i in got] == [1]
    assert len(seen) == 2


async def test_stream_needs_event_stream_content_type() -> None:
    client, _ = client_for(lambda r: httpx.Response(200, json={"job_id": JOB}))
    async with client:
        with pytest.raises(TransportError, match="text/event-stream"):
            await client.wait(JOB)


async def test_stream_of_unknown_job() -> None:
    client, _ = client_for(lambda r: error(404, "unknown job"))
    async with client:
        with pytest.raises(JobNotFound):
            async with client.stream(JOB):
                pytest.fail("entered the stream of an unknown job")


async def test_leaving_after_the_signal_reads_the_body_to_its_end() -> None:
    """The rest of the body is read on exit, so the connection could be reused."""
    body = Body([*sse_body(2), b": trailing comment\n\n"])
    client, _ = client_for(lambda r: sse_response(body))
    async with client:
        async with client.stream(JOB) as events:
            while not isinstance(await events.receive(), TerminalSignal):
                pass
            assert (body.finished, body.closed) == (False, False)
        assert (body.finished, body.closed) == (True, True)


async def test_leaving_stream_early_closes_the_response() -> None:
    body = Body(sse_body(50))
    client, _ = client_for(lambda r: sse_response(body))
    async with client:
        async with client.stream(JOB) as events:
            await events.receive()
        assert body.closed and not body.finished
        with pytest.raises(trio.ClosedResourceError):
            await events.receive()


async def test_cancelled_stream_closes_the_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()

    class Stuck(Body):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield frame(1, event(1))
            if self.closed:
                raise httpx.ReadError("connection closed")
            await gate.wait()  # the job is quiet: no more bytes for now
            yield frame(2, "[DONE]")

    body = Stuck([])
    client, _ = client_for(lambda r: sse_response(body))
    async with client:
        with trio.move_on_after(5) as scope:
            async with client.stream(JOB) as events:
                await events.receive()
                await events.receive()
        assert scope.cancelled_caught
        assert trio.current_time() == 5
        assert body.closed


# -- submit_and_stream (the one-call form) ---------------------------------------------------


async def test_submit_and_stream_one_call() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/v1/jobs")
        assert request.headers["accept"] == "text/event-stream"
        assert json.loads(request.content) == {"n": 2, "tags": {"a": "b"}}
        return sse_response(Body(sse_body(2)), **{"x-job-id": JOB})

    client, seen = client_for(handler)
    got: list[str] = []
    async with client:
        assert await client.submit_and_stream({"n": 2}, got.append, tags={"a": "b"}) == JOB
    assert got == [event(1), event(2), "[DONE]"]
    assert len(seen) == 1


async def test_an_on_line_error_propagates_and_closes_the_stream() -> None:
    body = Body(sse_body(5))
    client, _ = client_for(lambda r: sse_response(body, **{"x-job-id": JOB}))

    def on_line(line: str) -> None:
        raise ValueError(f"cannot handle {line[:6]}")

    async with client:
        with pytest.raises(ValueError, match="cannot handle"):
            await client.submit_and_stream({"n": 5}, on_line)
    assert body.closed and not body.finished


async def test_submit_and_stream_follows_a_201_answer() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(201, json={"job_id": JOB, "sse_url": f"/v1/jobs/{JOB}/stream"})
        return sse_response(Body(sse_body(1, "[CANCELLED]")))

    client, seen = client_for(handler)
    got: list[str] = []
    async with client:
        with pytest.raises(JobCancelled) as info:
            await client.submit_and_stream({"n": 1}, got.append)
    assert info.value.job_id == JOB
    assert got == [event(1), "[CANCELLED]"]
    assert [r.method for r in seen] == ["POST", "GET"]


async def test_submit_and_stream_refused() -> None:
    client, _ = client_for(lambda r: error(422, "invalid field", [{"loc": ["priority"]}]))
    async with client:
        with pytest.raises(HTTPStatusError) as info:
            await client.submit_and_stream({"n": 1}, print, priority="urgent")  # type: ignore[arg-type]
    assert info.value.status_code == 422


# -- reconnects -----------------------------------------------------------------------------


async def test_reconnect_resumes_after_last_event_without_duplicates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Drop after event 3; the server then replays from 3 (one too many): no duplicate."""

    def handler(request: httpx.Request) -> httpx.Response:
        if "last-event-id" not in request.headers:
            chunks = sse_body(3, None)
            return sse_response(Body(chunks, httpx.RemoteProtocolError("incomplete chunked read")))
        assert request.headers["last-event-id"] == "3"
        return sse_response(Body(sse_body(6, "[DONE]", first=3)))

    client, seen = client_for(handler, backoff_s=0.25)
    async with client:
        start = trio.current_time()
        async with client.stream(JOB) as events:
            items = [item async for item in events]
        assert trio.current_time() - start == 0.25
    assert [i.id for i in items] == [1, 2, 3, 4, 5, 6, 7]
    assert isinstance(items[-1], TerminalSignal)
    assert events.reconnects == 1
    assert [r.headers.get("last-event-id") for r in seen] == [None, "3"]


async def test_body_ending_without_signal_is_resumed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A clean end before the signal (a server draining) is resumed like a drop."""
    answers = iter(
        [
            sse_response(Body([*sse_body(2, None), b": server shutting down\n\n"])),
            sse_response(Body(sse_body(4, "[DONE]", first=3))),
        ]
    )
    client, seen = client_for(lambda r: next(answers))
    async with client, client.stream(JOB) as events:
        assert [item.id async for item in events] == [1, 2, 3, 4, 5]
    assert [r.headers.get("last-event-id") for r in seen] == [None, "2"]


async def test_body_always_ending_without_signal_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, seen = client_for(lambda r: sse_response(Body(sse_body(0, None))), max_reconnects=2)
    async with client:
        with pytest.raises(StreamEndedWithoutSignal, match="2 reconnect") as info:
            await client.wait(JOB)
    assert isinstance(info.value.__cause__, StreamEndedWithoutSignal)
    assert len(seen) == 3


async def test_reconnect_of_the_one_call_form_uses_the_stream_url(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = Body(sse_body(2, None), httpx.ReadError("connection reset"))
            return sse_response(body, **{"x-job-id": JOB})
        assert request.url.path == f"/v1/jobs/{JOB}/stream"
        assert request.headers["last-event-id"] == "2"
        return sse_response(Body(sse_body(4, "[ERROR] late failure", first=3)))

    client, _ = client_for(handler)
    got: list[str] = []
    async with client:
        with pytest.raises(JobFailed, match="late failure"):
            await client.submit_and_stream({"n": 4}, got.append)
    assert got == [event(1), event(2), event(3), event(4), "[ERROR] late failure"]


async def test_reconnects_give_up_after_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Backoff 0.1, 0.2, 0.4, 0.8 s and then capped by the server's retry (0.5 s here)."""

    def handler(request: httpx.Request) -> httpx.Response | Exception:
        if "last-event-id" not in request.headers:
            chunks = [b"retry: 500\n\n", frame(1, event(1))]
            return sse_response(Body(chunks, httpx.ReadError("reset")))
        return httpx.ConnectError("connection refused")

    client, seen = client_for(handler, max_reconnects=4, backoff_s=0.1)
    got: list[Any] = []
    async with client:
        start = trio.current_time()
        async with client.stream(JOB) as events:
            with pytest.raises(StreamEndedWithoutSignal, match="4 reconnect attempt") as info:
                await collect_into(events, got)
        assert trio.current_time() - start == pytest.approx(0.1 + 0.2 + 0.4 + 0.5)
    assert [i.id for i in got] == [1]
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(seen) == 5
    assert events.reconnects == 4


async def test_progress_resets_the_attempt_count(autojump_clock: trio.testing.MockClock) -> None:
    """Each connection delivers one new event and drops: the stream still completes."""

    def handler(request: httpx.Request) -> httpx.Response:
        last = int(request.headers.get("last-event-id", "0"))
        if last == 4:
            return sse_response(Body([frame(5, "[DONE]")]))
        return sse_response(Body([frame(last + 1, event(last + 1))], httpx.ReadError("reset")))

    client, seen = client_for(handler, max_reconnects=1)
    async with client:
        await client.wait(JOB)
    assert len(seen) == 5


async def test_reconnect_retries_503_but_not_404(autojump_clock: trio.testing.MockClock) -> None:
    answers = iter(
        [
            sse_response(Body([frame(1, event(1))], httpx.ReadError("reset"))),
            error(503, "shutting down"),
            sse_response(Body([frame(2, event(2))], httpx.ReadError("reset"))),
            error(404, "unknown job"),
        ]
    )
    client, seen = client_for(lambda r: next(answers))
    async with client:
        with pytest.raises(JobNotFound):
            await client.wait(JOB)
    assert [r.headers.get("last-event-id") for r in seen] == [None, "1", "1", "2"]


async def test_no_reconnect_when_disabled() -> None:
    client, seen = client_for(
        lambda r: sse_response(Body([frame(1, event(1))], httpx.ReadError("reset"))),
        max_reconnects=0,
    )
    async with client:
        with pytest.raises(StreamEndedWithoutSignal, match="0 reconnect"):
            await client.wait(JOB)
    assert len(seen) == 1


async def test_drop_after_the_signal_is_not_an_error() -> None:
    body = Body([frame(1, event(1)), frame(2, "[DONE]")], httpx.RemoteProtocolError("cut"))
    client, seen = client_for(lambda r: sse_response(body))
    async with client:
        await client.wait(JOB)
    assert len(seen) == 1


async def test_messages_without_their_own_id_are_not_taken_for_replays() -> None:
    """SSE ids persist across blocks: a block with no ``id:`` is new, not a duplicate."""
    chunks = [frame(1, event(1)), frame(None, event(2)), frame(2, event(3)), frame(3, "[DONE]")]
    client, _ = client_for(lambda r: sse_response(Body(chunks)))
    lines: list[str] = []
    async with client, client.stream(JOB) as events:
        lines = [line async for line in events.lines()]
    assert lines == [event(1), event(2), event(3), "[DONE]"]


async def test_resume_from_a_given_event_id() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["last-event-id"] == "5"
        return sse_response(Body([frame(6, event(6)), frame(7, "[DONE]")]))

    client, _ = client_for(handler)
    async with client, client.stream(JOB, last_event_id=5) as events:
        assert [item.id async for item in events] == [6, 7]


async def test_a_204_answer_ends_the_stream_without_a_signal() -> None:
    """A resume at or past the signal's id gets 204: nothing more comes, nothing is retried."""
    client, seen = client_for(lambda r: httpx.Response(204))
    async with client:
        async with client.stream(JOB, last_event_id=7) as events:
            assert [item async for item in events] == []
            assert events.terminal is None and events.reconnects == 0
        with pytest.raises(StreamEndedWithoutSignal):
            await client.wait(JOB, last_event_id=7)
    assert len(seen) == 2


def test_client_options_are_checked() -> None:
    with pytest.raises(ValueError, match="max_reconnects"):
        JobClient(BASE, max_reconnects=-1)
    with pytest.raises(ValueError, match="timeout"):
        JobClient(BASE, timeout=0)
