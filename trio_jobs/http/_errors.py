"""JSON error bodies: every error the job API answers is ``{"error": ..., "detail": ...}``."""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Quart, Response
from werkzeug.exceptions import HTTPException

__all__ = [
    "ApiError",
    "error_body",
    "error_response",
    "install_error_handlers",
    "json_bytes",
    "validation_detail",
]

logger = logging.getLogger("trio_jobs.http")

_SHORT = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "request timeout",
    409: "conflict",
    413: "request body too large",
    415: "unsupported media type",
    421: "misdirected request",
    422: "invalid request",
    426: "upgrade required",
    500: "internal server error",
}


class ApiError(Exception):
    """Raise in a route to answer ``status`` with ``{"error": error, "detail": detail}``.

    The daemons' own routes use it too, so every error of a trio-jobs server has one shape.
    """

    def __init__(
        self,
        status: int,
        error: str | None = None,
        detail: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error = error or _SHORT.get(status, "error")
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{status} {self.error}: {detail}")

    def response(self) -> Response:
        return error_response(self.status, self.error, self.detail, headers=self.headers)


def json_bytes(data: Any) -> bytes:
    """The one JSON encoding of every response body (ASCII, compact; unknown types as str)."""
    return json.dumps(data, ensure_ascii=True, separators=(",", ":"), default=str).encode()


def error_body(error: str, detail: Any = None) -> bytes:
    """``{"error": error, "detail": detail}`` as JSON bytes."""
    return json_bytes({"error": error, "detail": detail})


def error_response(
    status: int, error: str, detail: Any = None, *, headers: dict[str, str] | None = None
) -> Response:
    """A JSON error response (``application/json``) with the given status."""
    response = Response(error_body(error, detail), status=status, content_type="application/json")
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def validation_detail(errors: list[Any], prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """pydantic ``errors()`` reduced to JSON-safe ``{"loc", "msg", "type"}`` items."""
    out = []
    for err in errors:
        loc = [*prefix, *err.get("loc", ())]
        out.append(
            {
                "loc": [p if isinstance(p, int) else str(p) for p in loc],
                "msg": str(err.get("msg", "")),
                "type": str(err.get("type", "")),
            }
        )
    return out


def install_error_handlers(app: Quart) -> list[Any]:
    """Make every error of ``app`` a JSON body, Quart's own 404/405/413 included; return
    the handlers installed.

    Unexpected exceptions become a logged 500 with a JSON body; ``trio.Cancelled`` and
    other BaseExceptions are never caught.
    """

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error.response()

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response | HTTPException:
        status = error.code or 500
        if status < 400:  # routing redirects (e.g. a missing trailing slash) stay as they are
            return error
        headers: dict[str, str] = {}
        valid_methods = getattr(error, "valid_methods", None)
        if status == 405 and valid_methods:
            headers["Allow"] = ", ".join(valid_methods)
        return error_response(
            status, _SHORT.get(status, error.name.lower()), error.description, headers=headers
        )

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        logger.exception("unhandled error in a trio-jobs route", exc_info=error)
        return error_response(500, "internal server error", type(error).__name__)

    return [_api_error, _http_error, _unexpected]
