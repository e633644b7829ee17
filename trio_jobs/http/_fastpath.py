"""An ASGI fast path for ``DELETE /v1/jobs/{id}``: the cancel without Quart's request work.

A client cancelling a job waits for ``[CANCELLED]`` on its open stream, and Quart's
per-request work (request context, hooks, routing, a response object) costs about as much
as the cancel itself. The fast path answers with the same :meth:`JobService.cancel`, the
same auth check and the same JSON bodies as the blueprint's route, and hands the request
to Quart whenever it could not answer exactly as the route would: a request with a body,
a ``root_path``, a path the route would not match, or an app with request hooks other than
the job API's own (``JobService.fast_paths``, set while the app serves). Quart's
``request_started``/``request_finished`` signals are not sent for the requests it answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from ._errors import ApiError, error_body, json_bytes, logger
from ._service import JobService

__all__ = ["CancelFastPath", "only_these_hooks"]

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

_JSON = (b"content-type", b"application/json")


def only_these_hooks(app: Any, ours: Iterable[Any]) -> bool:
    """True when ``app`` runs no request hook (before/after/teardown request, URL value
    preprocessor) other than ``ours``: then a request it would route to the job API
    needs nothing from Quart but the route itself."""
    allowed = set(ours)
    for hooks in (app.before_request_funcs, app.url_value_preprocessors):
        for funcs in hooks.values():
            if any(func not in allowed for func in funcs):
                return False
    for hooks in (app.after_request_funcs, app.teardown_request_funcs):
        if any(hooks.values()):
            return False
    return True


def _read_headers(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bool, str | None]:
    """(whether the request has a body, its first ``Authorization`` header)."""
    has_body = False
    authorization: str | None = None
    for name, value in headers:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            has_body = True
    return has_body, authorization


class CancelFastPath:
    """ASGI middleware in front of a Quart app: answers ``DELETE {prefix}/v1/jobs/{id}``
    itself when ``service.fast_paths`` allows, passes everything else to ``app``."""

    def __init__(self, app: ASGIApp, service: JobService, url_prefix: str | None) -> None:
        self.app = app
        self.service = service
        self.jobs_path = (url_prefix or "").rstrip("/") + "/v1/jobs/"

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "DELETE"
            and self.service.fast_paths
            and not scope["root_path"]
        ):
            path = scope["path"]
            job_id = path[len(self.jobs_path) :]
            if path.startswith(self.jobs_path) and job_id and "/" not in job_id:
                has_body, authorization = _read_headers(scope["headers"])
                if not has_body:  # a body is left to Quart, which reads and limits it
                    await self._cancel(scope, send, job_id, authorization)
                    return
        await self.app(scope, receive, send)

    async def _cancel(
        self, scope: HTTPScope, send: ASGISendCallable, job_id: str, authorization: str | None
    ) -> None:
        service = self.service
        headers = [_JSON]
        try:
            server = scope["server"]
            service.check_auth(authorization, str(server[0]) if server else None)
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
