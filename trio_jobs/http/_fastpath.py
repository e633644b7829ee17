"""An ASGI fast path for ``DELETE /v1/jobs/{id}``: the cancel without Quart's request work.

A client cancelling a job waits for ``[CANCELLED]`` on its open stream, and Quart's
per-request work (request and app contexts, hooks, routing, a response object) costs
about as much as the cancel itself. The fast path answers with the same
:meth:`JobService.cancel`, auth and content-type checks and JSON bodies as the blueprint's
route (and the cross-site rules of ``_cross_site.CrossSiteGuard`` stand in front of both).

It answers only when Quart would do nothing else than run that route, checked on every
request (a few dictionary lookups): the app serves (``JobService.fast_paths``); nothing
wrapped Quart's ``asgi_app`` before the blueprint was mounted; the app has no request
hooks, error handlers, teardown functions or connected Quart signals but the job API's
own; no other ``DELETE`` route, no host or subdomain matching, no ``SERVER_NAME``; and the
request has no body and no ``root_path``. Anything else goes to Quart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import quart
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from ._cross_site import content_refusal
from ._errors import ApiError, error_body, json_bytes, logger
from ._guard import has_body
from ._service import JobService

__all__ = ["CancelFastPath", "wraps_quart_directly"]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
_SIGNALS = (
    quart.appcontext_popped,
    quart.appcontext_pushed,
    quart.appcontext_tearing_down,
    quart.got_request_exception,
    quart.request_finished,
    quart.request_started,
    quart.request_tearing_down,
)


def wraps_quart_directly(app: Any) -> bool:
    """True while ``app.asgi_app`` is still Quart's own (no middleware installed yet)."""
    return getattr(app.asgi_app, "__func__", None) is type(app).asgi_app


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's first ``Authorization`` header."""
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def _handlers(spec: Any) -> Iterator[Any]:
    for by_code in spec.values():
        for by_class in by_code.values():
            yield from by_class.values()


class CancelFastPath:
    """ASGI middleware around Quart's ``asgi_app`` (``inner``: Quart's own, guarded by
    :class:`ConnectionGuard`): answers ``DELETE {prefix}/v1/jobs/{id}`` itself when
    nothing but the job API's route would run (see the module docstring), passes
    everything else on."""

    def __init__(
        self,
        app: Any,
        inner: ASGIApp,
        service: JobService,
        url_prefix: str | None,
        *,
        hooks: Iterable[Any],
        error_handlers: Iterable[Any],
        endpoint: str,
    ) -> None:
        self.app = app
        self.inner = inner
        self.service = service
        self.jobs_path = (url_prefix or "").rstrip("/") + "/v1/jobs/"
        self._hooks = frozenset(hooks)
        self._error_handlers = frozenset(error_handlers)
        self._endpoint = endpoint

    def only_the_route(self) -> bool:
        """Whether Quart would run nothing but the job API's route (and its auth hook)."""
        app = self.app
        if app.url_map.host_matching or app.config.get("SERVER_NAME"):
            return False
        for funcs in app.before_request_funcs.values():
            if any(func not in self._hooks for func in funcs):
                return False
        for hooks in (
            app.url_value_preprocessors,
            app.after_request_funcs,
            app.teardown_request_funcs,
        ):
            if any(hooks.values()):
                return False
        if app.teardown_appcontext_funcs or any(signal.receivers for signal in _SIGNALS):
            return False
        if any(
            handler not in self._error_handlers for handler in _handlers(app.error_handler_spec)
        ):
            return False
        for rule in app.url_map.iter_rules():
            is_delete = rule.methods is not None and "DELETE" in rule.methods
            if (
                is_delete
                and not rule.websocket
                and (rule.endpoint != self._endpoint or rule.subdomain or rule.host)
            ):
                return False
        return True

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "DELETE"
            and self.service.fast_paths
            and not scope.get("root_path")
        ):
            path = scope["path"]
            job_id = path[len(self.jobs_path) :]
            if (
                path.startswith(self.jobs_path)
                and job_id
                and "/" not in job_id
                and not has_body(scope["headers"])  # left to Quart, which reads and limits it
                and self.only_the_route()
            ):
                await self._cancel(scope, send, job_id, _authorization(scope["headers"]))
                return
        await self.inner(scope, receive, send)

    async def _cancel(
        self, scope: HTTPScope, send: ASGISendCallable, job_id: str, authorization: str | None
    ) -> None:
        service = self.service
        headers = [_JSON]
        try:
            server = scope.get("server")
            service.check_auth(authorization, str(server[0]) if server else None)
            refused = content_refusal("DELETE", scope["headers"])
            if refused is not None:
                raise refused
            status, body = 200, json_bytes(await service.cancel(job_id))
        except ApiError as exc:
            status, body = exc.status, error_body(exc.error, exc.detail)
            headers.extend(
                (key.lower().encode("latin-1"), value.encode("latin-1"))
                for key, value in exc.headers.items()
            )
        except Exception as exc:
            logger.exception("unhandled error in a trio-jobs route", exc_info=exc)
            status, body = 500, error_body("internal server error", type(exc).__name__)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
