"""The job routes below Quart: an ASGI fast path for the requests every job makes.

``POST /v1/jobs``, ``GET /v1/jobs/{id}/stream``, ``GET /v1/jobs/{id}`` and ``DELETE
/v1/jobs/{id}`` cost far less answered here than through quart-trio, which opens a nursery
and two tasks per request and builds request and app contexts, a routing match, hooks and a
response object around a few microseconds of work. The fast path calls the same
``_handlers`` functions as the blueprint's Quart routes (auth, the content-type rule,
body limits, validation, errors, metrics), so the answers are the same; the cross-site
rules of ``_cross_site.CrossSiteGuard`` stand in front of both.

Tasks: a request that needs no waiting (a submit without a durable store, a record, a
stream whose job already ended) runs in hypercorn's request task alone. Only while a
request must wait for something slow (a durable submit's commit, a stream's next event)
does one task watch for the client leaving, so that leaving cancels the wait exactly as
it does under Quart.

It answers only when Quart would run nothing else than that route: the app serves
(``JobService.fast_paths``); nothing wrapped Quart's ``asgi_app`` before the blueprint
was mounted; the app has no request hooks, error handlers, teardown functions or
connected Quart signals but the job API's own; no host matching or ``SERVER_NAME``; no
route of the app's own with that method under ``/v1/jobs``; and the request has no query
string and no ``root_path``, and (but for ``POST``) no body. The app-wide part is worked
out once, at the first request, and again after any Quart setup method (a hook, a route,
an error handler added later); signals are checked on every request. Anything else, and
``HEAD``, goes to Quart.

An app adds routes of its own to the fast path with :func:`add_fast_route` (the queen's
OpenAI ``POST`` routes): the same rules apply (the path must route to that endpoint, whose
view is still the one registered), and the route's handler is the one its Quart view
calls. Such a handler waits watched for the client leaving (once the body is read), and
a streamed answer's head goes out with its first chunk, in one write.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import quart
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import _handlers as handlers
from ._connection import Inbox
from ._errors import ApiError, logger
from ._guard import has_body, with_request_end
from ._handlers import Answer
from ._http11 import HOLD_HEAD, Exchange
from ._service import JobService
from ._sse import SseBody

__all__ = ["FastHandler", "JobRoutes", "add_fast_route", "wraps_quart_directly"]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
FastHandler = Callable[[Any, AsyncIterable[bytes], "int | None"], Awaitable[Answer]]
"""A route's work below Quart: ``(scope, body chunks, Content-Length) -> Answer``. The
chunks raise ``RequestEntityTooLarge`` past the app's ``MAX_CONTENT_LENGTH`` (as Quart's
``request.body``); ``on_request_end(scope, ...)`` works on the scope. The Quart view of
the same route calls it with ``request.scope, request.body, request.content_length``."""

_SIGNALS = (
    quart.appcontext_popped,
    quart.appcontext_pushed,
    quart.appcontext_tearing_down,
    quart.got_request_exception,
    quart.request_finished,
    quart.request_started,
    quart.request_tearing_down,
)
# Each route: its method and a path (after the prefix) that must route to it.
_ROUTES = {
    "submit": ("POST", "/v1/jobs"),
    "stream": ("GET", "/v1/jobs/job-0/stream"),
    "record": ("GET", "/v1/jobs/job-0"),
    "cancel": ("DELETE", "/v1/jobs/job-0"),
}
_STREAM_SUFFIX = "/stream"
_FRESH_TRIPS = 2
"""Scheduler trips the head of a just-submitted job's stream waits for its first events:
the job's task (started at the submit) runs its first step within the first; whichever
order the two tasks run in, it has after the second."""


def wraps_quart_directly(app: Any) -> bool:
    """True while ``app.asgi_app`` is still Quart's own (no middleware installed yet)."""
    return getattr(app.asgi_app, "__func__", None) is type(app).asgi_app


def _handlers_of(spec: Any) -> Iterable[Any]:
    for by_code in spec.values():
        for by_class in by_code.values():
            yield from by_class.values()


@dataclass(frozen=True, slots=True)
class _Extra:
    """A route added with :func:`add_fast_route`."""

    endpoint: str
    view: Any
    handler: FastHandler


def add_fast_route(app: Any, method: str, path: str, endpoint: str, handler: FastHandler) -> bool:
    """Answer ``method path`` (exact, no prefix) with ``handler`` below Quart whenever
    Quart would run nothing else than the view of ``endpoint`` (as registered now, which
    must call ``handler``). False when the app has no fast path (middleware was installed
    before the job blueprint): Quart answers, which is the same."""
    routes = getattr(app, "extensions", {}).get(FAST_ROUTES_KEY)
    if not isinstance(routes, JobRoutes):
        return False
    routes.add_route(method, path, endpoint, app.view_functions[endpoint], handler)
    return True


FAST_ROUTES_KEY = "trio_jobs.fast_routes"


class _ClientGone(Exception):
    """The client disconnected before the answer: there is no one to answer."""


class _RequestChunks:
    """The request body from ASGI ``receive``, as Quart's ``request.body`` gives it:
    ``RequestEntityTooLarge`` past the app's ``MAX_CONTENT_LENGTH``.

    :meth:`take_ready` takes the messages the server has already queued without a
    scheduler trip, when ``receive`` is an :class:`Inbox`'s or a trio memory channel's
    (hypercorn's own): a small body usually arrives with its request, and then reading
    it needs no waiting."""

    __slots__ = ("_done", "_limit", "_nowait", "_ready", "_receive", "_size", "read")

    def __init__(self, receive: ASGIReceiveCallable, declared: int | None, limit: Any) -> None:
        self._receive = receive
        channel = getattr(receive, "__self__", None)
        self._nowait = (
            channel.receive_nowait
            if isinstance(channel, (Exchange, Inbox, trio.MemoryReceiveChannel))
            else None
        )
        self._ready: list[bytes] = []
        self._limit: int | None = limit if isinstance(limit, int) else None
        self._size = 0
        self._done = False
        self.read: trio.Event | None = None
        """Set once the whole body was received, when not None."""
        if self._limit is not None and declared is not None and declared > self._limit:
            self._size = declared  # too large before any byte arrives

    @property
    def done(self) -> bool:
        """The whole body has been received."""
        return self._done

    def take_ready(self, limit: int) -> bytes | None:
        """The whole body if it has arrived and is at most ``limit`` bytes (and within
        the app's limit), taken without waiting; else None (what was taken is kept for
        the iteration)."""
        nowait = self._nowait
        if nowait is not None:
            while not self._done:
                try:
                    message = nowait()
                except trio.WouldBlock:
                    break
                self._take(message)
        if (
            self._done
            and self._size <= limit
            and (self._limit is None or self._size <= self._limit)
        ):
            body = b"".join(self._ready)
            self._ready.clear()
            return body
        return None

    def _take(self, message: Any) -> None:
        if message["type"] == "http.disconnect":
            raise _ClientGone
        if message["type"] == "http.request":
            self._done = not message.get("more_body", False)
            if self._done and self.read is not None:
                self.read.set()
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if chunk:
                self._ready.append(chunk)

    def __aiter__(self) -> _RequestChunks:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._limit is not None and self._size > self._limit:
                raise RequestEntityTooLarge()
            if self._ready:
                return self._ready.pop(0)
            if self._done:
                raise StopAsyncIteration
            self._take(await self._receive())


async def _watch(
    receive: ASGIReceiveCallable, scope: trio.CancelScope, after: trio.Event | None = None
) -> None:
    """Cancel ``scope`` when the client disconnects (listening once ``after`` is set: the
    request body is someone else's to read until then)."""
    if after is not None:
        await after.wait()
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def _encode(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(key.lower().encode("latin-1"), value.encode("latin-1")) for key, value in headers]


def _scan(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[str | None, str | None, str | None, bytes | None, bool]:
    """The request headers a fast route reads, in one pass: ``Authorization``,
    ``Accept`` and ``Last-Event-ID`` (the first of each), ``Content-Length`` (the last)
    and whether the body is chunked."""
    authorization = accept = last_event_id = None
    length: bytes | None = None
    chunked = False
    for name, value in headers:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"accept":
            if accept is None:
                accept = value.decode("latin-1")
        elif name == b"last-event-id":
            if last_event_id is None:
                last_event_id = value.decode("latin-1")
        elif name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = True
    return authorization, accept, last_event_id, length, chunked


def _check(service: JobService, scope: HTTPScope, authorization: str | None) -> None:
    """The request checks every route shares (auth, the content-type rule, the host)."""
    server = scope.get("server")
    handlers.check_request(
        service,
        scope["method"],
        scope["path"],
        scope["headers"],
        authorization,
        str(server[0]) if server else None,
        routed=True,
    )


def _content_length(value: bytes | None, chunked: bool) -> int | None:
    """``Content-Length`` as werkzeug (and so Quart) reads it."""
    if value is None or chunked:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        return None


async def _send_whole(
    send: ASGISendCallable,
    status: int,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    unread: bool,
) -> None:
    """A whole answer, head and body in one write (``unread``: the request body was not
    read, so the connection cannot be reused)."""
    out = _encode(headers)
    out.append((b"content-length", str(len(body)).encode()))
    if unread:
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_chunks(send: ASGISendCallable, answer: Answer, body: AsyncIterator[bytes]) -> None:
    """A streamed answer: its head with the first chunk (one write), then each chunk as
    the body yields it, then its end."""
    try:
        first = await body.__anext__()
    except StopAsyncIteration:
        first = None
    try:
        start: Any = {
            "type": "http.response.start",
            "status": answer.status,
            "headers": _encode(answer.headers),
            HOLD_HEAD: first is not None,
        }
        await send(start)
        if first is not None:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()


class JobRoutes:
    """ASGI middleware around Quart's ``asgi_app`` (``inner``: Quart's own, guarded by
    ``ConnectionGuard``) answering the job routes itself when nothing else would run
    (see the module docstring); everything else goes on to ``inner``.

    ``endpoints``: the Quart endpoint of each route (``submit``, ``stream``, ``record``,
    ``cancel``); ``own``: the endpoint prefix of the job blueprint (its other routes do not
    count as the app's own)."""

    def __init__(
        self,
        app: Any,
        inner: ASGIApp,
        service: JobService,
        url_prefix: str | None,
        *,
        hooks: Iterable[Any],
        error_handlers: Iterable[Any],
        endpoints: Mapping[str, str],
        own: str,
    ) -> None:
        self.app = app
        self.inner = inner
        self.service = service
        self.prefix = (url_prefix or "").rstrip("/")
        self.jobs_path = self.prefix + "/v1/jobs"
        self.job_path = self.jobs_path + "/"
        self._hooks = frozenset(hooks)
        self._error_handlers = frozenset(error_handlers)
        self._endpoints = dict(endpoints)
        self._own = own
        self._routes: frozenset[str] | None = None
        self._extra: dict[tuple[str, str], _Extra] = {}
        app.extensions[FAST_ROUTES_KEY] = self
        # Quart calls ``_check_setup_finished`` from every setup method (a hook, a route,
        # an error handler): the routes the fast path may answer are worked out again.
        setup_check = app._check_setup_finished

        def check_setup(name: str) -> None:
            self._routes = None
            setup_check(name)

        app._check_setup_finished = check_setup

    def add_route(
        self, method: str, path: str, endpoint: str, view: Any, handler: FastHandler
    ) -> None:
        """See :func:`add_fast_route`."""
        self._extra[(method, path)] = _Extra(endpoint, view, handler)
        self._routes = None

    def invalidate(self) -> None:
        """Work out again which routes the fast path may answer (at the next request)."""
        self._routes = None

    def routes(self) -> frozenset[str]:
        """The routes Quart would run alone (with the job API's own hooks)."""
        routes = self._routes
        if routes is None:
            routes = self._routes = self._work_out_routes()
        return routes

    def _work_out_routes(self) -> frozenset[str]:
        app = self.app
        if app.url_map.host_matching or app.config.get("SERVER_NAME"):
            return frozenset()
        for funcs in app.before_request_funcs.values():
            if any(func not in self._hooks for func in funcs):
                return frozenset()
        for hooks in (
            app.url_value_preprocessors,
            app.after_request_funcs,
            app.teardown_request_funcs,
        ):
            if any(hooks.values()):
                return frozenset()
        if app.teardown_appcontext_funcs:
            return frozenset()
        if any(h not in self._error_handlers for h in _handlers_of(app.error_handler_spec)):
            return frozenset()
        adapter = app.url_map.bind("localhost")
        rules = [rule for rule in app.url_map.iter_rules() if not rule.websocket]
        routes = set()
        for kind, (method, sample) in _ROUTES.items():
            endpoint = self._endpoints[kind]
            try:
                matched, _ = adapter.match(self.prefix + sample, method=method)
            except HTTPException:
                continue
            if matched != endpoint:
                continue
            if any(
                rule.methods is not None
                and method in rule.methods
                and (
                    rule.subdomain
                    or rule.host
                    or (
                        not rule.endpoint.startswith(self._own)
                        and (method == "DELETE" or rule.rule.startswith(self.jobs_path))
                    )
                )
                for rule in rules
            ):
                continue
            routes.add(kind)
        for (method, path), extra in self._extra.items():
            try:
                matched, _ = adapter.match(path, method=method)
            except HTTPException:
                continue
            if matched == extra.endpoint and app.view_functions.get(matched) is extra.view:
                routes.add(f"{method} {path}")
        return frozenset(routes)

    def _route(self, method: str, path: str) -> tuple[str, str] | None:
        if self._extra and (method, path) in self._extra:
            return f"{method} {path}", ""
        if method == "POST":
            return ("submit", "") if path == self.jobs_path else None
        if not path.startswith(self.job_path):
            return None
        job_id = path[len(self.job_path) :]
        if method == "GET":
            if job_id.endswith(_STREAM_SUFFIX):
                job_id = job_id[: -len(_STREAM_SUFFIX)]
                kind = "stream"
            else:
                kind = "record"
        elif method == "DELETE":
            kind = "cancel"
        else:
            return None
        if not job_id or "/" in job_id:
            return None
        return kind, job_id

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if (
            scope["type"] == "http"
            and self.service.fast_paths
            and not scope.get("query_string")
            and not scope.get("root_path")
        ):
            method = scope["method"]
            route = self._route(method, scope["path"])
            if (
                route is not None
                and route[0] in self.routes()
                and (method == "POST" or not has_body(scope["headers"]))
                and not any(signal.receivers for signal in _SIGNALS)
            ):
                if route[0] in _ROUTES:
                    await self._answer(route[0], route[1], scope, receive, send)
                else:
                    extra = self._extra[(method, scope["path"])]
                    await self._answer_extra(extra.handler, scope, receive, send)
                return
        await self.inner(scope, receive, send)

    async def _answer(
        self,
        kind: str,
        job_id: str,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        service = self.service
        headers = scope["headers"]
        authorization, accept, last_event_id, length, chunked = _scan(headers)
        unread = kind == "submit" and (chunked or (length is not None and length.strip() != b"0"))
        chunks: _RequestChunks | None = None
        try:
            _check(service, scope, authorization)
            if kind == "submit":
                declared = _content_length(length, chunked)
                chunks = _RequestChunks(
                    receive, declared, self.app.config.get("MAX_CONTENT_LENGTH")
                )
                body = chunks.take_ready(service.max_body_bytes)
                if body is None:
                    body = await handlers.read_body(service, chunks, declared)
                event_stream = handlers.wants_event_stream(accept)
                if service.durable:
                    answer = await self._while_connected(
                        receive, handlers.submit(service, body, event_stream=event_stream)
                    )
                else:
                    answer = await handlers.submit(service, body, event_stream=event_stream)
            elif kind == "stream":
                after = handlers.resume_point(last_event_id, None)
                answer = await handlers.stream(service, job_id, after)
            elif kind == "record":
                answer = await handlers.record(service, job_id)
            else:
                answer = await handlers.cancel(service, job_id)
        except ApiError as exc:
            answer = handlers.error_answer(exc)
            unread = unread and "Connection" not in exc.headers
        except _ClientGone:
            return
        except Exception as exc:
            logger.exception("unhandled error in a trio-jobs route", exc_info=exc)
            answer = handlers.error_answer(
                ApiError(500, "internal server error", type(exc).__name__)
            )
        if isinstance(answer.body, SseBody):
            await self._stream(answer, answer.body, receive, send, fresh=kind == "submit")
            return
        if chunks is not None and chunks.done:  # read (or drained) to its end
            unread = False
        assert isinstance(answer.body, bytes)
        await _send_whole(send, answer.status, answer.headers, answer.body, unread)

    async def _answer_extra(
        self,
        handler: FastHandler,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        """Answer a route of :func:`add_fast_route`: the request checks of the job
        routes, then ``handler``, watched for the client leaving once the body is read;
        the request's end callbacks run however it ends."""
        service = self.service
        headers = scope["headers"]
        authorization, _, _, length, chunked = _scan(headers)
        unread = chunked or (length is not None and length.strip() != b"0")
        declared = _content_length(length, chunked)
        chunks = _RequestChunks(receive, declared, self.app.config.get("MAX_CONTENT_LENGTH"))
        chunks.read = read = trio.Event()
        if not unread:
            read.set()
        scope, ended = with_request_end(scope)
        answer: Answer | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, receive, nursery.cancel_scope, read)
                try:
                    _check(service, scope, authorization)
                    answer = await handler(scope, chunks, declared)
                except ApiError as exc:
                    answer = handlers.error_answer(exc)
                except _ClientGone:
                    pass
                except Exception as exc:
                    logger.exception("unhandled error in a trio-jobs route", exc_info=exc)
                    answer = handlers.error_answer(
                        ApiError(500, "internal server error", type(exc).__name__)
                    )
                if answer is not None:
                    body = answer.body
                    if isinstance(body, bytes):
                        if unread and not chunks.done:  # a body that came with the request
                            with contextlib.suppress(_ClientGone):
                                chunks.take_ready(service.max_body_bytes)
                        unread = (
                            unread
                            and not chunks.done
                            and all(key.lower() != "connection" for key, _ in answer.headers)
                        )
                        await _send_whole(send, answer.status, answer.headers, body, unread)
                    else:
                        assert not isinstance(body, SseBody)
                        await _send_chunks(send, answer, body)
                nursery.cancel_scope.cancel()
        finally:
            for callback in ended:
                callback()

    async def _while_connected(
        self, receive: ASGIReceiveCallable, work: Awaitable[Answer]
    ) -> Answer:
        """``await work``, cancelled if the client disconnects meanwhile."""
        outcome: Answer | Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch, receive, nursery.cancel_scope)
            try:
                outcome = await work
            except Exception as exc:
                outcome = exc
            nursery.cancel_scope.cancel()
        if outcome is None:
            raise _ClientGone
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _stream(
        self,
        answer: Answer,
        body: SseBody,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        *,
        fresh: bool = False,
    ) -> None:
        """Write an SSE answer: what is ready now (for a job that has ended: all of it, in
        one chunk), then, while the job goes on, more as it comes, with a task watching
        for the client leaving.

        ``fresh``: the job was just submitted. Its first events usually come as soon as
        it starts, a scheduler trip or two away (its runner starts its task at once when
        it has room): the head waits those two trips for them, to go out in the same
        write, and the job's first steps run before this request's writes."""
        headers = _encode(answer.headers)
        try:
            chunk = body.take()
            if chunk is None and fresh:
                for _ in range(_FRESH_TRIPS):
                    await trio.lowlevel.checkpoint()
                    chunk = body.take()
                    if chunk is not None:
                        break
            if chunk is not None and body.done:
                body.close()  # the stream is over before the client reads its end
            start: Any = {
                "type": "http.response.start",
                "status": 200,
                "headers": headers,
                HOLD_HEAD: chunk is not None,
            }
            await send(start)
            if chunk is not None:
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": not body.done}
                )
                if body.done:
                    return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, receive, nursery.cancel_scope)
                while True:
                    chunk = body.take()
                    if chunk is None:
                        await body.wait()
                        continue
                    if body.done:
                        body.close()
                    await send(
                        {"type": "http.response.body", "body": chunk, "more_body": not body.done}
                    )
                    if body.done:
                        break
                nursery.cancel_scope.cancel()
        finally:
            body.close()
