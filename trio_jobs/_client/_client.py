"""JobClient: submit jobs to a trio-jobs server over HTTP and follow their streams.

Shaped like httpx (``async with JobClient(url) as client:``, keyword-only options). Streams
are ``@asynccontextmanager``\\ s handing out trio receive channels: the job's narration events
and then exactly one :class:`TerminalSignal`. The outcome helpers (:meth:`JobClient.wait`,
:meth:`JobClient.submit_and_stream`) return on ``[DONE]``, raise :class:`JobFailed` on
``[ERROR]`` (:class:`JobTimeout` for a timeout), :class:`JobCancelled` on ``[CANCELLED]``, and
:class:`StreamEndedWithoutSignal` when a stream ends without its signal: never a silent
success. A dropped stream (or a body that ends before the signal) is resumed with
``Last-Event-ID`` (bounded attempts, exponential backoff on ``trio.sleep``), with no gap and
no duplicate. Streams are read to the end of the body so that httpx keeps the connection.
Every httpx and trio-websocket error becomes a trio-jobs error through one table
(``_errors``).

The client builds one :class:`HTTPConnection` (base URL, auth headers, the httpx pool, the
timeout, the reconnect policy, WebSockets) and the streams see only that.

Streams read what the network delivered as a batch: ``receive()`` costs a checkpoint per
item, ``await wait_ready()`` + ``receive_batch()`` one per network chunk, and
:meth:`JobClient.submit_and_stream` uses the batch path internally.

Cancellation: every public coroutine is a checkpoint; a cancelled request or stream closes
its connection (shielded, bounded), and nothing is retried. Cancelling the client side
never cancels the job on the server, except through the job's ``on_disconnect="cancel"``
policy or an explicit :meth:`JobClient.cancel`.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypedDict, Unpack

import httpx
import trio

from .._exceptions import TransportError
from .._models import JobState, Priority, RetryPolicy
from ._connection import HTTPConnection, alone, job_path
from ._errors import error_from_status, translating
from ._reconnect import ReconnectPolicy
from ._sse_stream import JobEventStream
from ._transport import Http11Transport, environment_proxy
from ._ws_stream import JobWebSocketStream

__all__ = ["DEFAULT_LIMITS", "JobClient", "SubmitOptions"]

_JOB_OPTIONS = frozenset(
    {"timeout_s", "priority", "retry", "tags", "metadata", "on_disconnect", "expires_s"}
)
#: Pool limits of a JobClient: no cap on open connections (one per open stream), and up
#: to 64 idle ones kept for reuse.
DEFAULT_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=64)


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """httpx's default certificate verification, built once per process: building it
    (loading the CA bundle) takes 40-250 ms, which every new client would pay again."""
    return httpx.create_ssl_context()


class SubmitOptions(TypedDict, total=False):
    """Job options sent at the top level of ``POST /v1/jobs`` beside the operation."""

    timeout_s: float
    priority: Priority | Literal["low", "normal", "high", "critical"]
    retry: RetryPolicy | Mapping[str, Any]
    tags: Mapping[str, str]
    metadata: Any
    on_disconnect: Literal["detach", "cancel"]
    expires_s: float


class _Dumpable(Protocol):
    """A pydantic model (anything with ``model_dump(mode="json")``)."""

    def model_dump(self, *, mode: str) -> dict[str, Any]: ...


Operation = Mapping[str, Any] | _Dumpable
LineCallback = Callable[[str], object]


def _job_body(op: Operation, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``POST /v1/jobs`` body: the operation's fields plus the job options on top."""
    if isinstance(op, Mapping):
        body = dict(op)
    elif callable(getattr(op, "model_dump", None)):
        body = op.model_dump(mode="json")
    else:
        raise TypeError(f"operation must be a mapping or a pydantic model, got {type(op)!r}")
    unknown = options.keys() - _JOB_OPTIONS
    if unknown:
        raise TypeError(f"unknown job option(s): {', '.join(sorted(unknown))}")
    for name, value in options.items():
        if value is None:
            continue
        if name in body:
            raise ValueError(f"job option {name!r} is also a field of the operation")
        if isinstance(value, RetryPolicy):
            value = value.to_dict()
        elif isinstance(value, Priority):
            value = value.label
        elif isinstance(value, Mapping):
            value = dict(value)
        body[name] = value
    return body


TagFilter = str | Sequence[str] | Mapping[str, str] | None
"""``"k:v"``, several of them, or a mapping of tags."""
TimeBound = datetime | float | str | None
"""An aware ``datetime`` (naive: UTC), epoch seconds, or ISO-8601 text."""


def _iso(bound: datetime | float | str) -> str:
    if isinstance(bound, str):
        return bound
    if isinstance(bound, datetime):
        when = bound if bound.tzinfo is not None else bound.replace(tzinfo=UTC)
    else:
        when = datetime.fromtimestamp(bound, UTC)
    return when.isoformat()


def _member(data: Any, key: str, what: str) -> Any:
    """``data[key]`` of a JSON answer, or a :class:`TransportError` naming the request."""
    if isinstance(data, dict) and key in data:
        return data[key]
    raise TransportError(f"{what}: the answer has no {key!r}: {str(data)[:200]}")


def _check_line_callback(on_line: LineCallback) -> None:
    if not callable(on_line):
        raise TypeError("on_line must be a callable taking one line (str)")


def _default_transport(base_url: str, limits: httpx.Limits) -> Http11Transport | None:
    """:class:`Http11Transport`, or None (httpx's own) when a proxy applies to ``base_url``."""
    if environment_proxy(httpx.URL(base_url)):
        return None
    return Http11Transport(verify=default_ssl_context(), limits=limits)


class JobClient:
    """An HTTP client of a trio-jobs server (queen, hive or any app of ``trio_jobs.http``).

    Use it as an async context manager; it owns one httpx connection pool::

        async with JobClient("http://127.0.0.1:7833", token=TOKEN) as client:
            job_id = await client.submit({"operation": "status"}, timeout_s=30)
            await client.wait(job_id)

    Args:
        base_url: The server's root URL (``http://host:port``).
        token: Sent as ``Authorization: Bearer <token>`` on every request.
        timeout: Seconds for connecting, writing and reading an answer; streams have no read
            timeout (a job may be quiet for long; the server sends keep-alive comments).
        transport: An httpx transport (``httpx.MockTransport`` in unit tests). The default
            speaks HTTP/1.1 on trio directly (h11, no httpcore: a streamed request costs
            about half), unless the environment names a proxy for ``base_url``: then
            httpx's own, which goes through it.
        max_reconnects: Reconnect attempts in a row, without a new event in between, before
            a dropped stream raises :class:`StreamEndedWithoutSignal`.
        backoff_s: The wait before the first reconnect attempt; doubled for each further one.
        limits: The connection pool's limits. The default, :data:`DEFAULT_LIMITS`, has no
            cap on connections: each open stream holds one for as long as its job runs, so
            httpx's default cap (100) would make the 101st stream wait and time out.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_reconnects: int = 5,
        backoff_s: float = 0.2,
        limits: httpx.Limits | None = None,
    ) -> None:
        if max_reconnects < 0 or backoff_s < 0 or timeout <= 0:
            raise ValueError("max_reconnects and backoff_s must be >= 0, timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_reconnects = max_reconnects
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # With a transport of its own, httpx sends every request through it (no proxy).
        only = transport or _default_transport(self.base_url, limits or DEFAULT_LIMITS)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=only,
            limits=limits or DEFAULT_LIMITS,
            verify=default_ssl_context(),
        )
        self._connection = HTTPConnection(
            base_url=self.base_url,
            http=self._http,
            headers=headers,
            timeout=timeout,
            policy=ReconnectPolicy(max_reconnects=max_reconnects, backoff_s=backoff_s),
            transport=only,
        )

    async def __aenter__(self) -> Self:
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (streams still open are cut)."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
            await self._http.aclose()

    # plain requests

    async def _json(
        self, method: str, path: str, *, job_id: str | None = None, **kwargs: Any
    ) -> Any:
        what = f"{method} {path}"
        with translating(what, job_id=job_id):
            response = await self._http.request(method, path, **kwargs)
        if response.is_error:
            raise error_from_status(
                response.status_code,
                response.content,
                job_id=job_id,
                reason=response.reason_phrase,
            )
        try:
            return response.json()
        except ValueError:
            raise TransportError(f"{what}: the answer is not JSON") from None

    async def submit(self, op: Operation, **options: Unpack[SubmitOptions]) -> str:
        """Create a job (``POST /v1/jobs``) and return its id.

        Args:
            op: The operation: a mapping, or a pydantic model (sent as
                ``model_dump(mode="json")``).
            **options: ``timeout_s``, ``priority``, ``retry`` (a dict or a
                :class:`RetryPolicy`), ``tags``, ``metadata``, ``on_disconnect``,
                ``expires_s``; None means "not given".

        Raises:
            HTTPStatusError: the server refused the job (400, 401, 413, 422, ...).
            TransportError: the server could not be reached.

        A cancel after the request went out may leave a job on the server whose id the
        caller never learns; use ``tags`` to find such jobs if that matters.
        """
        body = _job_body(op, options)
        data = await self._json("POST", "/v1/jobs", json=body)
        return str(_member(data, "job_id", "POST /v1/jobs"))

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job's record (``GET /v1/jobs/{id}``); :class:`JobNotFound` if unknown."""
        record: dict[str, Any] = await self._json("GET", job_path(job_id), job_id=job_id)
        return record

    async def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's state transitions, oldest first (``GET /v1/jobs/{id}/history``)."""
        data = await self._json("GET", job_path(job_id) + "/history", job_id=job_id)
        history: list[dict[str, Any]] = _member(data, "history", "GET history")
        return history

    async def list_jobs(
        self,
        state: JobState | str | None = None,
        tag: TagFilter = None,
        *,
        operation: str | None = None,
        since: TimeBound = None,
        until: TimeBound = None,
        limit: int | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> list[dict[str, Any]]:
        """Records of the server's jobs (its store's, so also finished jobs no longer in
        memory), oldest first (``order="desc"``: newest first), following pages.

        Args:
            state: only jobs in this state.
            tag: ``"k:v"``, several of them, or a mapping: jobs carrying every tag.
            operation: only jobs whose payload's ``operation`` is this.
            since: only jobs created at or after this time (aware ``datetime``, epoch
                seconds, or ISO-8601 text; zone-less means UTC).
            until: only jobs created before this time.
            limit: at most this many records (None: all of them).
            order: ``"asc"`` (oldest first) or ``"desc"``.
        """
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            want = None if limit is None else limit - len(out)
            page = await self.jobs_page(
                state,
                tag,
                operation=operation,
                since=since,
                until=until,
                limit=None if want is None else min(want, 1000),
                cursor=cursor,
                order=order,
            )
            out.extend(page["jobs"])
            cursor = page.get("next_cursor")
            if cursor is None or (limit is not None and len(out) >= limit):
                return out

    async def jobs_page(
        self,
        state: JobState | str | None = None,
        tag: TagFilter = None,
        *,
        operation: str | None = None,
        since: TimeBound = None,
        until: TimeBound = None,
        limit: int | None = None,
        cursor: str | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> dict[str, Any]:
        """One page of ``GET /v1/jobs``: ``{"jobs": [...], "next_cursor": str | None}``
        (filters as :meth:`list_jobs`; ``limit`` up to 1000, the server's default 100;
        ``cursor``: the previous page's ``next_cursor``).

        Raises:
            HTTPStatusError: 422 for a bad filter (the detail names it).
        """
        params: list[tuple[str, str]] = []
        if state is not None:
            params.append(("state", state.value if isinstance(state, JobState) else state))
        if isinstance(tag, str):
            params.append(("tag", tag))
        elif isinstance(tag, Mapping):
            params += [("tag", f"{k}:{v}") for k, v in tag.items()]
        elif tag is not None:
            params += [("tag", t) for t in tag]
        if operation is not None:
            params.append(("operation", operation))
        for name, bound in (("since", since), ("until", until)):
            if bound is not None:
                params.append((name, _iso(bound)))
        if limit is not None:
            params.append(("limit", str(limit)))
        if cursor is not None:
            params.append(("cursor", cursor))
        if order != "asc":
            params.append(("order", order))
        data = await self._json("GET", "/v1/jobs", params=params)
        jobs: list[dict[str, Any]] = _member(data, "jobs", "GET /v1/jobs")
        return {"jobs": jobs, "next_cursor": data.get("next_cursor")}

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel the job (``DELETE``) and return its record.

        Raises:
            JobNotFound: no such job (404).
            InvalidJobState: the job had already finished (409).
        """
        record: dict[str, Any] = await self._json("DELETE", job_path(job_id), job_id=job_id)
        return record

    async def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (needs no token)."""
        data: dict[str, Any] = await self._json("GET", "/health")
        return data

    # streams

    @asynccontextmanager
    async def stream(
        self, job_id: str, *, last_event_id: str | int | None = None
    ) -> AsyncIterator[JobEventStream]:
        """Follow a job's SSE stream: a channel of its events, then its terminal signal.

        The first connection is made on entering (an unknown job raises
        :class:`JobNotFound` there; an unreachable server :class:`TransportError`); later
        drops are resumed (see :class:`JobEventStream`). ``last_event_id`` starts after
        that event. Leaving the block early (or being cancelled) closes the connection;
        the job itself goes on unless its ``on_disconnect`` policy is ``cancel``.
        """
        events = JobEventStream(self._connection, job_id, last_event_id=last_event_id)
        try:
            with translating(f"GET /v1/jobs/{job_id}/stream", job_id=job_id):
                await events._open()
            yield events
        finally:
            await events.aclose()

    @asynccontextmanager
    async def submit_stream(
        self, op: Operation, **options: Unpack[SubmitOptions]
    ) -> AsyncIterator[JobEventStream]:
        """Create a job and follow it, in one request: ``POST /v1/jobs`` with ``Accept:
        text/event-stream`` (a server that answers 201 instead is followed on ``/stream``).

        The stream's ``job_id`` names the new job once the block is entered; later drops
        are resumed as in :meth:`stream`. One round trip less than :meth:`submit` then
        :meth:`stream`. Leaving the block early (or being cancelled) closes the
        connection; the job goes on unless its ``on_disconnect`` policy is ``cancel``.

        Raises:
            HTTPStatusError: the server refused the job (on entering).
            TransportError: the server could not be reached (on entering).
        """
        body = _job_body(op, options)
        events = JobEventStream(self._connection, None)
        try:
            with translating("POST /v1/jobs"):
                request = self._connection.stream_request("POST", "/v1/jobs", json=body)
                await events._open(request)
            yield events
        finally:
            await events.aclose()

    async def _consume(self, events: JobEventStream, on_line: LineCallback | None) -> None:
        """Read a stream to the end of its body, passing each line to ``on_line``."""
        while True:
            try:
                batch = await events._next_batch()
            except trio.EndOfChannel:
                break
            if on_line is not None:
                for line, _ in batch:
                    on_line(line)
        events.check()

    async def wait(self, job_id: str, *, last_event_id: str | int | None = None) -> None:
        """Follow the job's stream to its end: return on ``[DONE]``, else raise the outcome.

        Raises:
            JobFailed: ``[ERROR]`` (``JobTimeout`` for a timeout).
            JobCancelled: ``[CANCELLED]``.
            StreamEndedWithoutSignal: the stream ended or could not be resumed before its
                signal.
            JobNotFound: no such job.
        """
        async with self.stream(job_id, last_event_id=last_event_id) as events:
            await self._consume(events, None)

    async def submit_and_stream(
        self, op: Operation, on_line: LineCallback, **options: Unpack[SubmitOptions]
    ) -> str:
        """Create a job and follow it to its end, passing every wire line to ``on_line``.

        One request: ``POST /v1/jobs`` with ``Accept: text/event-stream`` answers with the
        job's stream (a server that answers 201 instead is followed on ``/stream``). A drop
        is resumed like :meth:`stream`. ``on_line`` gets each event's JSON line and the
        signal line; an exception it raises propagates (the connection is closed; the job
        goes on unless its ``on_disconnect`` policy is ``cancel``).

        Returns:
            The job id, once the stream ended with ``[DONE]``.

        Raises:
            JobFailed, JobTimeout, JobCancelled, StreamEndedWithoutSignal: the outcome, as
                for :meth:`wait`; the exception's ``job_id`` names the job.
            HTTPStatusError: the server refused the job.
        """
        _check_line_callback(on_line)
        body = _job_body(op, options)
        events = JobEventStream(self._connection, None)
        try:
            with translating("POST /v1/jobs"):
                request = self._connection.stream_request("POST", "/v1/jobs", json=body)
                await events._open(request)
            await self._consume(events, on_line)
        finally:
            await events.aclose()
        assert events.job_id is not None
        return events.job_id

    @asynccontextmanager
    async def stream_ws(
        self, job_id: str, *, last_event_id: str | int | None = None
    ) -> AsyncIterator[JobWebSocketStream]:
        """Follow a job over its WebSocket: the same items as :meth:`stream`.

        A task of this block owns the connection and resumes it after a drop (see
        :class:`JobWebSocketStream`); ``last_event_id`` starts after that event (sent as
        ``Last-Event-ID``). The handle's :meth:`JobWebSocketStream.send_cancel` cancels the
        job. Leaving the block closes the WebSocket with code 1000 (cancelled from outside,
        it just closes the socket: no close handshake can complete then); an error raised
        in the block comes out alone, not in an exception group.

        Raises:
            JobNotFound: no such job (the server refused the handshake with 404).
            HTTPStatusError: another refusal (401 without a valid token, ...).
            TransportError: the server could not be reached.
        """
        channel = JobWebSocketStream(self._connection, job_id, last_event_id=last_event_id)
        with alone():
            async with trio.open_nursery() as nursery:
                await nursery.start(channel._run)
                try:
                    yield channel
                finally:
                    await channel.aclose()
