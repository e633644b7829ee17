"""The job routes' work, written once for the two ways a request reaches it.

A request for ``POST /v1/jobs``, ``GET /v1/jobs/{id}/stream``, ``GET /v1/jobs/{id}`` or
``DELETE /v1/jobs/{id}`` is answered either by the blueprint's Quart route (``_app``) or,
when Quart would run nothing else, by the ASGI fast path below Quart (``_asgi``). Both
call the functions here with what they read from the request, and both turn the
:class:`Answer` they get back into their own response: so auth, the cross-site content
rule, body limits, validation, the job's creation, error bodies and metrics exist once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import trio
from pydantic import ValidationError
from werkzeug.datastructures import MIMEAccept
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_accept_header

from .._channel import StreamItem
from .._exceptions import JobNotFound
from .._signals import TerminalSignal
from ._cross_site import content_refusal
from ._errors import ApiError, error_body, json_bytes, validation_detail
from ._options import OPTION_KEYS, JobOptions, non_finite_at, split_job_options
from ._service import JobService, not_found
from ._sse import SSE_HEADERS, SseBody

__all__ = [
    "Answer",
    "cancel",
    "check_request",
    "error_answer",
    "json_answer",
    "read_body",
    "record",
    "stream",
    "submit",
    "wants_event_stream",
]

BODY_TIMEOUT_S = 60.0
_JSON_TYPE = ("Content-Type", "application/json")


@dataclass(slots=True)
class Answer:
    """What a route answers: status, headers and a body (bytes, or the SSE body of a
    job's stream, which the caller must close once the request is over, or chunks of a
    stream whose first one comes at once)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | SseBody | AsyncIterator[bytes] = b""


def json_answer(data: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Answer:
    return Answer(status, [_JSON_TYPE, *headers], json_bytes(data))


def error_answer(error: ApiError) -> Answer:
    """The JSON error body (``{"error", "detail"}``) of ``error``, with its headers."""
    return Answer(
        error.status, [_JSON_TYPE, *error.headers.items()], error_body(error.error, error.detail)
    )


# ---- every request ---------------------------------------------------------------------


def check_request(
    service: JobService,
    method: str,
    path: str,
    headers: Iterable[tuple[bytes, bytes]],
    authorization: str | None,
    server_host: str | None,
    *,
    routed: bool,
) -> None:
    """Auth (every route but ``GET`` of ``service.public_paths``), then the content type of
    a routed ``POST``/``DELETE`` (``routed``: the request matched a route). Raises
    ``ApiError``."""
    if not (path in service.public_paths and method in ("GET", "HEAD")):
        service.check_auth(authorization, server_host)
    if routed:
        refused = content_refusal(method, headers)
        if refused is not None:
            raise refused


@lru_cache(maxsize=256)
def wants_event_stream(accept: str | None) -> bool:
    """Whether an ``Accept`` header prefers ``text/event-stream`` to JSON (werkzeug's
    negotiation, as Quart's ``request.accept_mimetypes.best_match`` does it)."""
    best = parse_accept_header(accept, MIMEAccept).best_match(
        ["application/json", "text/event-stream"]
    )
    return best == "text/event-stream"


# ---- POST /v1/jobs ---------------------------------------------------------------------


async def read_body(
    service: JobService, chunks: AsyncIterable[bytes], declared: int | None
) -> bytes:
    """A POST body of at most ``max_body_bytes`` (else 413), from ``chunks`` (which raise
    ``RequestEntityTooLarge`` past the app's own limit); ``declared``: Content-Length.

    An oversized body is still read and dropped (up to ``drain_cap``) so that the client,
    still sending, gets to read the 413 and its connection stays usable; beyond that the
    413 says ``Connection: close``. A body that does not arrive in 60 s is a 408.
    """
    limit = service.max_body_bytes
    drain_cap = max(8 << 20, 4 * limit)
    too_big = declared is not None and declared > limit
    drained = not (declared is not None and declared > drain_cap)
    parts: list[bytes] = []
    size = 0
    if drained:
        with trio.move_on_after(BODY_TIMEOUT_S) as timeout:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        too_big = True
                        parts.clear()
                        if size > drain_cap:
                            drained = False
                            break
                    elif not too_big:
                        parts.append(chunk)
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
    return b"".join(parts)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(body: bytes) -> Any:
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
        # Lone surrogates (only a ``\u`` escape can make one) decode fine but cannot be
        # written back as UTF-8 later.
        if "\\u" in text:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "malformed JSON", str(exc)[:500]) from None
    return data


def invalid(errors: list[dict[str, Any]]) -> ApiError:
    """A 422 naming the fields (``[{"loc", "msg", "type"}, ...]``)."""
    return ApiError(422, "invalid request", errors)


def one_error(loc: list[str | int], msg: str, kind: str = "value_error") -> ApiError:
    return invalid([{"loc": loc, "msg": msg, "type": kind}])


_DEFAULT_OPTIONS = JobOptions().create_kwargs()


async def submit(service: JobService, body: bytes, *, event_stream: bool) -> Answer:
    """``POST /v1/jobs``: validate the body, create the job (answered once stored), and
    answer 201 with its URLs, or (``event_stream``) its SSE stream."""
    data = parse_json_body(body)
    if not isinstance(data, dict):
        raise one_error([], "the body must be a JSON object", "dict_type")
    bad_number = non_finite_at(data)
    if bad_number is not None:
        raise one_error(bad_number, "must be a finite number", "finite_number")
    on_disconnect = "detach"
    if not OPTION_KEYS.isdisjoint(data):
        try:
            data, options = split_job_options(data)
        except ValidationError as exc:
            raise invalid(validation_detail(exc.errors())) from None
        kwargs = options.create_kwargs()
        on_disconnect = options.on_disconnect
    else:
        kwargs = dict(_DEFAULT_OPTIONS)
    payload: Any = data
    if service.parse_payload is not None:
        try:
            payload = service.parse_payload(data)
        except ValidationError as exc:
            raise invalid(validation_detail(exc.errors())) from None
        except (ValueError, TypeError) as exc:
            raise one_error([], str(exc) or type(exc).__name__) from None
    job_id = (
        await service.submit(payload, kwargs)
        if service.durable
        else service.create(payload, kwargs)
    )
    if on_disconnect == "cancel":
        service.mark_cancel_on_disconnect(job_id)
    location = f"/v1/jobs/{job_id}"
    if event_stream:
        answer = _sse(service, service.registry.open_stream(job_id), None)
        answer.headers.append(("Location", location))
        return answer
    return json_answer(
        {"job_id": job_id, "sse_url": f"{location}/stream", "ws_url": f"{location}/ws"},
        201,
        [("Location", location)],
    )


# ---- GET /v1/jobs/{id}/stream ----------------------------------------------------------


def _event_id(raw: str | None, where: str) -> int | None:
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise one_error([where], "must be a non-negative integer event id", "int_parsing")
    return int(raw)


def resume_point(header: str | None, query: str | None) -> int | None:
    """``Last-Event-ID`` header or ``?last_event_id=``: resume after that event id.

    An empty header means "from the start" (as browsers send it); both are validated
    when both are given, and the header wins.
    """
    query_id = _event_id(query, "last_event_id")
    after = _event_id(header or None, "Last-Event-ID")
    return after if after is not None else query_id


def _sse(service: JobService, job_stream: Any, pending: list[StreamItem] | None) -> Answer:
    """The SSE answer of a job's stream; the stream counts as open from here on."""
    body = SseBody(service, job_stream, pending)
    headers = [*SSE_HEADERS.items(), ("X-Job-Id", job_stream.job_id)]
    return Answer(200, headers, body)


def open_stream(service: JobService, job_id: str, after: int | None) -> Any:
    try:
        return service.registry.open_stream(job_id, after)
    except JobNotFound:
        raise not_found(job_id) from None


async def stream(
    service: JobService,
    job_id: str,
    after: int | None,
    *,
    head: bool = False,
) -> Answer:
    """``GET`` (or ``HEAD``) ``/v1/jobs/{id}/stream`` resuming after event id ``after``:
    the SSE answer, or 204 for a resume at or after the terminal signal (what makes an
    EventSource stop reconnecting, WHATWG HTML)."""
    await service.known(job_id)
    job_stream = open_stream(service, job_id, after)
    pending: list[StreamItem] = []
    if after is not None:
        pending = job_stream.receive_batch(service.batch_limit)
        first = pending[0] if pending else None
        if type(first) is TerminalSignal and first.id is not None and first.id <= after:
            job_stream.close()
            return Answer(204)
    if head:
        job_stream.close()
        return Answer(200, list(SSE_HEADERS.items()))
    return _sse(service, job_stream, pending)


# ---- GET and DELETE /v1/jobs/{id} ------------------------------------------------------


async def record(service: JobService, job_id: str) -> Answer:
    return json_answer(await service.record(job_id))


async def cancel(service: JobService, job_id: str) -> Answer:
    return json_answer(await service.cancel(job_id))
