"""``GET /v1/jobs``: its query parameters read into a :class:`JobQuery` (422 naming the
parameter when one is bad), and a page as the JSON answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .._models import MAX_PAGE, JobPage, JobQuery, JobState
from ._errors import ApiError

__all__ = ["LIST_PARAMETERS", "job_query", "page_body"]

_STATES = ", ".join(state.value for state in JobState)
LIST_PARAMETERS = ("state", "tag", "operation", "since", "until", "limit", "cursor", "order")


def _bad(name: str, msg: str, kind: str = "value_error") -> ApiError:
    return ApiError(422, "invalid request", [{"loc": [name], "msg": msg, "type": kind}])


_EPOCH = datetime(1970, 1, 1)
_HALF_US = 5e-7


def _time(args: Any, name: str) -> float | None:
    """An ISO-8601 time (a zone-less one is UTC) as epoch seconds."""
    raw = args.get(name)
    if raw is None:
        return None
    text = raw.upper()
    leap = ":60" in text[16:19]  # RFC 3339 allows a leap second
    if leap:
        text = text[:17] + "59" + text[19:]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _bad(
            name, "must be an ISO-8601 time, e.g. 2026-01-31T12:00:00Z", "datetime"
        ) from None
    offset = when.utcoffset()
    seconds = (when.replace(tzinfo=None) - _EPOCH).total_seconds() + leap
    # Records show times rounded to the microsecond: a job's own ``created_at`` passed
    # back as ``since`` includes it, as ``until`` excludes it.
    return seconds - (offset.total_seconds() if offset is not None else 0.0) - _HALF_US


def job_query(args: Any) -> JobQuery:
    """The listing asked for by ``GET /v1/jobs``'s parameters (``args`` a multi-dict).

    Raises:
        ApiError: 422 naming the first bad parameter.
    """
    state = args.get("state")
    if state is not None and state not in JobState._value2member_map_:
        raise _bad("state", f"must be one of {_STATES}", "enum")
    tags: list[tuple[str, str]] = []
    for tag in args.getlist("tag"):
        key, sep, value = tag.partition(":")
        if not sep or not key:
            raise _bad("tag", f"must look like key:value, got {tag!r}")
        tags.append((key, value))
    operation = args.get("operation")
    if operation is not None and not operation:
        raise _bad("operation", "must not be empty")
    since, until = _time(args, "since"), _time(args, "until")
    raw_limit = args.get("limit", "100")
    if not raw_limit.isascii() or not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise _bad("limit", f"must be an integer from 1 to {MAX_PAGE}", "int_parsing")
    order = args.get("order", "asc")
    if order not in ("asc", "desc"):
        raise _bad("order", "must be asc or desc", "enum")
    cursor = args.get("cursor")
    try:
        return JobQuery(
            state=None if state is None else JobState(state),
            tags=tuple(tags),
            operation=operation,
            since=since,
            until=until,
            limit=int(raw_limit),
            cursor=cursor,
            order=order,
        )
    except ValueError as exc:
        raise _bad("cursor", str(exc)) from None


def page_body(page: JobPage) -> dict[str, Any]:
    """The JSON answer: ``{"jobs": [...], "next_cursor": "..." | null}``."""
    return {"jobs": [r.to_dict() for r in page.records], "next_cursor": page.next_cursor}
