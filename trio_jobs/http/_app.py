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

from quart import Blueprint, Response, request, websocket
from quart_trio import QuartTrio

from .._exceptions import JobNotFound, StoreUnavailable
from .._registry import JobRegistry
from .._runner import Executor
from . import _handlers as handlers
from ._asgi import JobRoutes, wraps_quart_directly
from ._cross_site import CrossSiteGuard, SitePolicy
from ._errors import ApiError, install_error_handlers, json_bytes
from ._guard import ConnectionGuard, on_request_end
from ._handlers import Answer
from ._listing import job_query, page_body
from ._metrics import CONTENT_TYPE
from ._openapi import openapi_document
from ._service import JobService, PayloadParser, not_found
from ._sse import SseBody, ws_follow

__all__ = ["JobsBlueprint", "answer_response", "create_app", "jobs_blueprint", "job_service"]

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


def answer_response(answer: Answer) -> Response:
    """A route's answer as a Quart response. An SSE body counts as open from here on,
    and as abandoned if the request ends before its signal was written, however early."""
    body = answer.body
    response = Response(body, status=answer.status)
    if isinstance(body, SseBody):
        on_request_end(request.scope, body.close)
    if not isinstance(body, bytes):
        # Quart's RESPONSE_TIMEOUT (60 s by default) would silently cut the stream.
        response.timeout = None
    for key, value in answer.headers:
        response.headers[key] = value
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
        error_handlers = install_error_handlers(app)
        guarded = ConnectionGuard(app.asgi_app)
        inner: Any = guarded
        if wraps_quart_directly(app) and not state.subdomain:
            own = f"{state.name_prefix}.{state.name}".lstrip(".")
            views = {
                "submit": submit_job,
                "stream": stream_job,
                "record": get_job,
                "cancel": cancel_job,
            }
            inner = JobRoutes(
                app,
                guarded,
                service,
                state.url_prefix,
                hooks=[_check_request],
                error_handlers=error_handlers,
                endpoints={kind: f"{own}.{view.__name__}" for kind, view in views.items()},
                own=own + ".",
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
        handlers.check_request(
            service,
            request.method,
            request.path,
            request.scope["headers"],
            request.headers.get("Authorization"),
            _server_host(request.scope),
            routed=request.routing_exception is None,
        )

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

    @bp.post("/v1/jobs")
    async def submit_job() -> Response:
        body = await handlers.read_body(service, request.body, request.content_length)
        event_stream = handlers.wants_event_stream(request.headers.get("Accept"))
        return answer_response(await handlers.submit(service, body, event_stream=event_stream))

    @bp.get("/v1/jobs/<job_id>/stream")
    async def stream_job(job_id: str) -> Response:
        after = handlers.resume_point(
            request.headers.get("Last-Event-ID"), request.args.get("last_event_id")
        )
        head = request.method == "HEAD"
        return answer_response(await handlers.stream(service, job_id, after, head=head))

    @bp.websocket("/v1/jobs/<job_id>/ws")
    async def stream_job_ws(job_id: str) -> Response | None:
        try:
            after = handlers.resume_point(
                websocket.headers.get("Last-Event-ID"), websocket.args.get("last_event_id")
            )
            await service.known(job_id)
            stream = handlers.open_stream(service, job_id, after)
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

    # These four routes are normally answered by JobRoutes (_asgi), with the same handlers.
    @bp.get("/v1/jobs/<job_id>")
    async def get_job(job_id: str) -> Response:
        return answer_response(await handlers.record(service, job_id))

    @bp.delete("/v1/jobs/<job_id>")
    async def cancel_job(job_id: str) -> Response:
        return answer_response(await handlers.cancel(service, job_id))

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
