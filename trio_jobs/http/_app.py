"""The job API as a quart-trio blueprint, and an app factory around it.

``jobs_blueprint(...)`` is the one implementation of the SPEC §3 endpoints; the daemons
mount it on their own app (or call :func:`create_app` and add routes to the result). Mounted
on an app, the blueprint also brings app-wide behaviour: JSON errors for every status (also
Quart's own 404/405), bearer-token auth for every route except ``/health`` (and the other
``JobService.public_paths``, such as the dashboard's static page), the cross-site
rules and opt-in CORS (``_cross_site``), and the job runner (``run_jobs`` in
``app.nursery`` from ``before_serving`` to ``after_serving``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import trio
from pydantic import ValidationError
from quart import Blueprint, Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge

from .._channel import JobStream, StreamItem
from .._exceptions import JobNotFound, StoreUnavailable
from .._registry import JobRegistry
from .._runner import Executor
from .._signals import TerminalSignal
from ._cross_site import CrossSiteGuard, SitePolicy, content_refusal
from ._errors import ApiError, install_error_handlers, json_bytes, validation_detail
from ._fastpath import CancelFastPath, wraps_quart_directly
from ._guard import ConnectionGuard, on_request_end
from ._listing import job_query, page_body
from ._metrics import CONTENT_TYPE
from ._openapi import openapi_document
from ._options import non_finite_at, split_job_options
from ._service import JobService, PayloadParser, not_found
from ._sse import SSE_HEADERS, SseBody, ws_follow

__all__ = ["JobsBlueprint", "create_app", "jobs_blueprint", "job_service"]

EXTENSION_KEY = "trio_jobs"


class JobsBlueprint(Blueprint):
    """A blueprint of the job API; ``service`` holds its registry, options and metrics."""

    service: JobService


def job_service(app: QuartTrio) -> JobService | None:
    """The :class:`JobService` of the job blueprint mounted on ``app``, if any."""
    service = app.extensions.get(EXTENSION_KEY)
    return service if isinstance(service, JobService) else None


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    response = Response(json_bytes(data), status=status, content_type="application/json")
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json_body(body: bytes) -> Any:
    """Decode a request body as strict JSON: UTF-8 without a byte order mark (``json``
    itself would also take UTF-16 and UTF-32), no NaN/Infinity, no lone surrogates."""
    if not body.strip():
        raise ApiError(400, "malformed JSON", "the request body is empty; send a JSON object")
    if body.startswith(b"\xef\xbb\xbf"):
        raise ApiError(
            400, "malformed JSON", "the body starts with a byte order mark; send UTF-8 without one"
        )
    if b"\x00" in body or body.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ApiError(
            400, "malformed JSON", "the body looks like UTF-16 or UTF-32; send UTF-8 JSON"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed JSON", f"the body is not valid UTF-8: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
        # Lone surrogates decode fine but cannot be written back as UTF-8 later.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed JSON", str(exc)[:500]) from None
    return data


def _loc_errors(errors: list[dict[str, Any]]) -> ApiError:
    return ApiError(422, "invalid request", errors)


def _one_error(loc: list[str | int], msg: str, kind: str = "value_error") -> ApiError:
    return _loc_errors([{"loc": loc, "msg": msg, "type": kind}])


def _event_id(raw: str | None, where: str) -> int | None:
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise _one_error([where], "must be a non-negative integer event id", "int_parsing")
    return int(raw)


def _resume_point(headers: Any, args: Any) -> int | None:
    """``Last-Event-ID`` header or ``?last_event_id=``: resume after that event id.

    An empty header means "from the start" (as browsers send it); both are validated
    when both are given, and the header wins.
    """
    header = headers.get("Last-Event-ID") or None
    query = _event_id(args.get("last_event_id"), "last_event_id")
    after = _event_id(header, "Last-Event-ID")
    return after if after is not None else query


def _sse_response(
    service: JobService, stream: JobStream, pending: list[StreamItem] | None = None
) -> Response:
    """The SSE response of ``stream``; the stream counts as open from here on, and as
    abandoned if the request ends before its signal was written, however early."""
    body = SseBody(service, stream, pending)
    on_request_end(request.scope, body.close)
    response = Response(body, status=200)
    for key, value in SSE_HEADERS.items():
        response.headers[key] = value
    response.headers["X-Job-Id"] = stream.job_id
    # Quart's RESPONSE_TIMEOUT (60 s by default) would silently cut the stream.
    response.timeout = None
    return response


def jobs_blueprint(
    registry: JobRegistry,
    executor: Executor | None,
    *,
    name: str = "trio-jobs",
    parse_payload: PayloadParser | None = None,
    token: str | None = None,
    max_body_bytes: int = 1 << 20,
    keepalive_s: float = 15.0,
    max_concurrent: int | None = None,
    require_token_off_loopback: bool = True,
    payload_schema: Mapping[str, Any] | None = None,
    cors_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
) -> JobsBlueprint:
    """The job API (SPEC §3) as a blueprint, for one app (a second mount raises).

    Args:
        registry: the jobs this API serves.
        executor: runs the registry's queued jobs while the app serves (None: something
            else runs them).
        name: the server's name, in ``/health``, the OpenAPI title and auth realm.
        parse_payload: turns a POST body (job options removed) into the job's payload;
            may raise pydantic ``ValidationError`` or ``ValueError`` (answered 422).
            None: the body itself (any JSON object) is the payload.
        token: bearer token every route but ``/health`` requires (None: no auth).
        max_body_bytes: larger POST bodies are answered 413.
        keepalive_s: seconds of silence after which a stream gets ``: keep-alive``.
        max_concurrent: jobs run at once by the runner (None: no limit).
        require_token_off_loopback: without a token, refuse to serve on a non-loopback
            address (``serve`` raises; requests that arrive anyway get 401).
        payload_schema: JSON schema of the payload part of a POST body, for the OpenAPI
            document (default: any JSON object).
        cors_origins: origins (``https://host[:port]``) whose pages may use the API
            cross-origin (CORS); none by default. Requests from any other foreign
            ``Origin`` get 403.
        allowed_hosts: ``Host`` names a loopback-bound server answers besides its own
            (a reverse proxy's); others get 421.

    Raises:
        ValueError: a bad option (a CORS origin with a path, a host name with a port...).
    """
    policy = SitePolicy(cors_origins, allowed_hosts)
    service = JobService(
        registry,
        executor,
        name=name,
        parse_payload=parse_payload,
        token=token,
        max_body_bytes=max_body_bytes,
        keepalive_s=keepalive_s,
        max_concurrent=max_concurrent,
        require_token_off_loopback=require_token_off_loopback,
    )
    bp = JobsBlueprint("trio_jobs", __name__)
    bp.service = service
    openapi_cache: dict[str, bytes] = {}

    mounted: list[QuartTrio] = []

    def _register(state: Any) -> None:
        if not isinstance(state.app, QuartTrio):
            raise TypeError("the job blueprint needs a quart_trio.QuartTrio app")
        if mounted:
            raise RuntimeError("a job blueprint can be mounted on one app only")
        app = state.app
        mounted.append(app)
        app.extensions[EXTENSION_KEY] = service
        handlers = install_error_handlers(app)
        guarded = ConnectionGuard(app.asgi_app)
        inner: Any = guarded
        if wraps_quart_directly(app) and not state.subdomain:
            inner = CancelFastPath(
                app,
                guarded,
                service,
                state.url_prefix,
                hooks=[_check_request],
                error_handlers=handlers,
                endpoint=f"{state.name_prefix}.{state.name}.{cancel_job.__name__}".lstrip("."),
            )
        # Outermost: every request, the fast path's included, meets the cross-site rules.
        app.asgi_app = CrossSiteGuard(inner, policy)  # type: ignore[method-assign]  # Quart's middleware hook

    bp.record_once(_register)

    # ---- app-wide hooks ------------------------------------------------------------

    @bp.before_app_serving
    async def _start_runner() -> None:
        app = mounted[0]
        service.fast_paths = True
        await app.nursery.start(service.run_runner)

    @bp.after_app_serving
    async def _stop_runner() -> None:
        service.fast_paths = False
        service.stop_runner()

    def _server_host(scope: Mapping[str, Any]) -> str | None:
        server = scope.get("server")
        return str(server[0]) if server else None

    @bp.before_app_request
    async def _check_request() -> None:
        """Auth (every route but ``service.public_paths``); a routed POST/DELETE's
        content type."""
        if not (request.path in service.public_paths and request.method in ("GET", "HEAD")):
            service.check_auth(request.headers.get("Authorization"), _server_host(request.scope))
        if request.routing_exception is None:
            refused = content_refusal(request.method, request.scope["headers"])
            if refused is not None:
                raise refused

    @bp.before_app_websocket
    async def _auth_websocket() -> Response | None:
        try:
            service.check_auth(
                websocket.headers.get("Authorization"), _server_host(websocket.scope)
            )
        except ApiError as exc:
            return exc.response()
        return None

    # ---- jobs ------------------------------------------------------------------------

    async def _read_body() -> bytes:
        """The POST body, at most ``max_body_bytes`` (else 413).

        An oversized body is still read and dropped (up to ``drain_cap``) so that the
        client, still sending, gets to read the 413 and its connection stays usable;
        beyond that the 413 says ``Connection: close``.
        """
        limit = service.max_body_bytes
        drain_cap = max(8 << 20, 4 * limit)
        declared = request.content_length
        too_big = declared is not None and declared > limit
        drained = not (declared is not None and declared > drain_cap)
        chunks: list[bytes] = []
        size = 0
        if drained:
            with trio.move_on_after(60.0) as timeout:
                try:
                    async for chunk in request.body:
                        size += len(chunk)
                        if size > limit:
                            too_big = True
                            chunks.clear()
                            if size > drain_cap:
                                drained = False
                                break
                        elif not too_big:
                            chunks.append(chunk)
                except RequestEntityTooLarge:
                    too_big, drained = True, False
            if timeout.cancelled_caught:
                raise ApiError(
                    408,
                    "request timeout",
                    "the request body did not arrive in 60 s",
                    headers={"Connection": "close"},
                )
        if too_big:
            raise ApiError(
                413,
                "request body too large",
                f"the limit is {limit} bytes",
                headers={} if drained else {"Connection": "close"},
            )
        return b"".join(chunks)

    @bp.post("/v1/jobs")
    async def submit_job() -> Response:
        data = _parse_json_body(await _read_body())
        if not isinstance(data, dict):
            raise _one_error([], "the body must be a JSON object", "dict_type")
        bad_number = non_finite_at(data)
        if bad_number is not None:
            raise _one_error(bad_number, "must be a finite number", "finite_number")
        try:
            data, options = split_job_options(data)
        except ValidationError as exc:
            raise _loc_errors(validation_detail(exc.errors())) from None
        payload: Any = data
        if service.parse_payload is not None:
            try:
                payload = service.parse_payload(data)
            except ValidationError as exc:
                raise _loc_errors(validation_detail(exc.errors())) from None
            except (ValueError, TypeError) as exc:
                raise _one_error([], str(exc) or type(exc).__name__) from None
        job_id = await service.submit(payload, options.create_kwargs())
        if options.on_disconnect == "cancel":
            service.mark_cancel_on_disconnect(job_id)
        location = f"/v1/jobs/{job_id}"
        best = request.accept_mimetypes.best_match(["application/json", "text/event-stream"])
        if best == "text/event-stream":
            response = _sse_response(service, registry.open_stream(job_id))
            response.headers["Location"] = location
            return response
        return _json(
            {"job_id": job_id, "sse_url": f"{location}/stream", "ws_url": f"{location}/ws"},
            201,
            {"Location": location},
        )

    def _open_stream(job_id: str, after: int | None) -> JobStream:
        try:
            return registry.open_stream(job_id, after)
        except JobNotFound:
            raise not_found(job_id) from None

    @bp.get("/v1/jobs/<job_id>/stream")
    async def stream_job(job_id: str) -> Response:
        after = _resume_point(request.headers, request.args)
        await service.known(job_id)
        stream = _open_stream(job_id, after)
        pending: list[StreamItem] = []
        if after is not None:
            pending = stream.receive_batch(service.batch_limit)
            first = pending[0] if pending else None
            if type(first) is TerminalSignal and first.id is not None and first.id <= after:
                # A resume at or after the signal: the stream is over. 204 is what makes
                # an EventSource stop reconnecting (WHATWG HTML, server-sent events).
                stream.close()
                return Response(b"", status=204)
        if request.method == "HEAD":
            stream.close()
            response = Response(b"", status=200)
            for key, value in SSE_HEADERS.items():
                response.headers[key] = value
            return response
        return _sse_response(service, stream, pending)

    @bp.websocket("/v1/jobs/<job_id>/ws")
    async def stream_job_ws(job_id: str) -> Response | None:
        try:
            after = _resume_point(websocket.headers, websocket.args)
            await service.known(job_id)
            stream = _open_stream(job_id, after)
        except ApiError as exc:
            return exc.response()
        await websocket.accept()
        await ws_follow(service, websocket, stream)
        return None

    @bp.get("/v1/jobs/<job_id>/ws")
    async def stream_job_ws_over_http(job_id: str) -> Response:
        raise ApiError(
            426,
            "upgrade required",
            "this endpoint speaks WebSocket: send the handshake (Upgrade: websocket); "
            f"for Server-Sent Events use /v1/jobs/{job_id}/stream",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )

    @bp.get("/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> Response:
        return _json(await service.record(job_id))

    # Normally answered by CancelFastPath (same service.cancel) before Quart sees it.
    @bp.delete("/v1/jobs/<job_id>")
    async def cancel_job(job_id: str) -> Response:
        return _json(await service.cancel(job_id))

    @bp.get("/v1/jobs/<job_id>/history")
    async def job_history(job_id: str) -> Response:
        await service.known(job_id)
        try:
            history = registry.history(job_id)
        except JobNotFound:
            raise not_found(job_id) from None
        return _json({"job_id": job_id, "history": [entry.to_dict() for entry in history]})

    @bp.get("/v1/jobs")
    async def list_jobs() -> Response:
        query = job_query(request.args)
        try:
            page = await registry.query_jobs(query)
        except StoreUnavailable as exc:
            raise ApiError(
                503, "store unavailable", str(exc), headers={"Retry-After": "1"}
            ) from None
        return _json(page_body(page))

    # ---- service endpoints -------------------------------------------------------------

    @bp.get("/health")
    async def health() -> Response:
        status, body = service.health()
        return _json(body, status)

    @bp.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), status=200, content_type=CONTENT_TYPE)

    @bp.get("/openapi.json")
    async def openapi() -> Response:
        if "doc" not in openapi_cache:
            doc = openapi_document(
                title=service.name,
                payload_schema=payload_schema,
                token=service.token is not None,
            )
            openapi_cache["doc"] = json.dumps(doc).encode()
        return Response(openapi_cache["doc"], status=200, content_type="application/json")

    return bp


def create_app(
    registry: JobRegistry,
    executor: Executor | None,
    *,
    name: str = "trio-jobs",
    parse_payload: PayloadParser | None = None,
    token: str | None = None,
    max_body_bytes: int = 1 << 20,
    keepalive_s: float = 15.0,
    max_concurrent: int | None = None,
    require_token_off_loopback: bool = True,
    payload_schema: Mapping[str, Any] | None = None,
    cors_origins: Iterable[str] = (),
    allowed_hosts: Iterable[str] = (),
) -> QuartTrio:
    """A quart-trio app serving the job API (see :func:`jobs_blueprint` for the arguments).

    Serve it with :func:`trio_jobs.http.serve`; add more routes to it as needed (they get
    the same auth and JSON errors).
    """
    app = QuartTrio(name)
    # For the app's other routes; POST /v1/jobs applies max_body_bytes itself.
    app.config["MAX_CONTENT_LENGTH"] = max(8 << 20, 4 * max_body_bytes)
    app.config["RESPONSE_TIMEOUT"] = 60
    app.config["BACKGROUND_TASK_SHUTDOWN_TIMEOUT"] = 5
    app.register_blueprint(
        jobs_blueprint(
            registry,
            executor,
            name=name,
            parse_payload=parse_payload,
            token=token,
            max_body_bytes=max_body_bytes,
            keepalive_s=keepalive_s,
            max_concurrent=max_concurrent,
            require_token_off_loopback=require_token_off_loopback,
            payload_schema=payload_schema,
            cors_origins=cors_origins,
            allowed_hosts=allowed_hosts,
        )
    )
    return app
