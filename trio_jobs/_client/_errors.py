"""The one place where transport errors and error answers become trio-jobs errors.

One ordered table (:data:`_RULES`, the first matching row wins, so specific rows stand above
general ones), in the manner of httpx's ``HTTPCORE_EXC_MAP``: each row names the exception
types it takes, the trio-jobs error it makes, and whether a reconnect may cure it. The
trio-websocket rows are used only once trio-websocket has been imported (by a WebSocket
stream), so that the HTTP client never pays for importing it. Error statuses map through
:func:`error_from_status`: 404 of a job is :class:`JobNotFound`, 409
:class:`InvalidJobState`, anything else :class:`HTTPStatusError`; 502, 503 and 504 say
"try again" and are the only statuses a stream reconnects after.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, NoReturn

import httpx
import trio

from .._exceptions import (
    HTTPStatusError,
    InvalidJobState,
    JobNotFound,
    TransportError,
    TrioJobsError,
)

__all__ = ["Mapped", "error_from_status", "map_error", "raise_mapped", "translating"]

_RETRYABLE_STATUS = frozenset({502, 503, 504})


def error_from_status(
    status: int, body: bytes, *, job_id: str | None = None, reason: str = ""
) -> TrioJobsError:
    """The exception for an error answer: the server's ``{"error", "detail"}`` JSON body."""
    error: str = reason or f"status {status}"
    detail: object = None
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        error, detail = data["error"], data.get("detail")
    elif body:
        detail = body[:200].decode("utf-8", "replace")
    if status == 404 and job_id is not None:
        return JobNotFound(job_id)
    if status == 409:
        text = f"{error}: {detail}" if detail else error
        return InvalidJobState(f"job {job_id}: {text}" if job_id else text)
    return HTTPStatusError(status, error, detail)


class Mapped(NamedTuple):
    """What an exception means to us: the error to raise, and whether a reconnect may cure it."""

    error: TrioJobsError
    reconnectable: bool


_Make = Callable[[Any, str, str | None], TrioJobsError]
_Cure = Callable[[TrioJobsError], bool]


class _Rule(NamedTuple):
    types: type[BaseException] | tuple[type[BaseException], ...]
    make: _Make
    cure: _Cure


def _failed(exc: BaseException, what: str, job_id: str | None) -> TrioJobsError:
    return TransportError(f"{what}: {type(exc).__name__}: {exc}")


def _timed_out_named(exc: BaseException, what: str, job_id: str | None) -> TrioJobsError:
    return TransportError(f"{what}: timed out ({type(exc).__name__})")


def _timed_out(exc: BaseException, what: str, job_id: str | None) -> TrioJobsError:
    return TransportError(f"{what}: timed out")


def _itself(exc: TrioJobsError, what: str, job_id: str | None) -> TrioJobsError:
    return exc


def _rejected(exc: Any, what: str, job_id: str | None) -> TrioJobsError:
    return error_from_status(exc.status_code, exc.body or b"", job_id=job_id)


def _handshake(exc: BaseException, what: str, job_id: str | None) -> TrioJobsError:
    cause = exc.__cause__ or exc
    return TransportError(f"{what}: {type(exc).__name__}: {cause}")


def _closed(exc: Any, what: str, job_id: str | None) -> TrioJobsError:
    return TransportError(f"{what}: websocket closed ({exc.reason})")


def _always(error: TrioJobsError) -> bool:
    return True


def _never(error: TrioJobsError) -> bool:
    return False


def _status_says_retry(error: TrioJobsError) -> bool:
    return isinstance(error, HTTPStatusError) and error.status_code in _RETRYABLE_STATUS


_RULES: tuple[_Rule, ...] = (
    _Rule(httpx.TimeoutException, _timed_out_named, _always),
    _Rule(httpx.TransportError, _failed, _always),
    # A body that cannot be decoded, a misused stream, a bad URL: no reconnect cures them.
    _Rule((httpx.HTTPError, httpx.StreamError, httpx.InvalidURL), _failed, _never),
    _Rule(HTTPStatusError, _itself, _status_says_retry),
    _Rule(TrioJobsError, _itself, _never),
    _Rule(trio.TooSlowError, _timed_out, _always),
    _Rule(OSError, _failed, _always),
)


def _websocket_rules() -> tuple[_Rule, ...]:
    """The trio-websocket rows; empty until a WebSocket stream has imported trio-websocket."""
    ws = sys.modules.get("trio_websocket")
    if ws is None:
        return ()
    return (
        # A refused handshake is an error answer; only "try again" statuses are retried.
        _Rule(ws.ConnectionRejected, _rejected, _status_says_retry),
        _Rule(ws.HandshakeError, _handshake, _always),
        _Rule(ws.ConnectionClosed, _closed, _always),
    )


def map_error(exc: BaseException, what: str, *, job_id: str | None = None) -> Mapped | None:
    """Look ``exc`` up in the table (None: not ours to map; let it through).

    ``what`` names the request or stream in the message; ``job_id`` turns a 404 into
    :class:`JobNotFound`. A trio-jobs error maps to itself.
    """
    for rule in (*_websocket_rules(), *_RULES):
        if isinstance(exc, rule.types):
            error = rule.make(exc, what, job_id)
            return Mapped(error, rule.cure(error))
    return None


def raise_mapped(exc: BaseException, mapped: Mapped) -> NoReturn:
    """Raise the mapped error, chained to ``exc`` (or ``exc`` itself when it maps to itself)."""
    if mapped.error is exc:
        raise exc
    raise mapped.error from exc


@contextmanager
def translating(what: str, *, job_id: str | None = None) -> Iterator[None]:
    """Run a block whose httpx/trio-websocket errors are raised as trio-jobs errors."""
    try:
        yield
    except Exception as exc:
        mapped = map_error(exc, what, job_id=job_id)
        if mapped is None:
            raise
        raise_mapped(exc, mapped)
