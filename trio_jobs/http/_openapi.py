"""The OpenAPI 3.1 document of the job API, built from the pydantic models it validates with."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from .._models import CURSOR_PATTERN, MAX_PAGE
from ._options import (
    CreatedBody,
    ErrorBody,
    HistoryBody,
    JobListBody,
    JobOptions,
    JobRecordBody,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_STATES = ["queued", "running", "retrying", "completed", "failed", "cancelled"]


def _query(name: str, schema: dict[str, Any], description: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
        **more,
    }


_LIST_PARAMETERS = [
    _query("state", {"type": "string", "enum": _STATES}, "Only jobs in this state."),
    _query(
        "tag",
        {"type": "array", "items": {"type": "string", "pattern": "^[^:]+:"}},
        "key:value; repeat for jobs carrying every one of these tags.",
        style="form",
        explode=True,
    ),
    _query(
        "operation",
        {"type": "string", "minLength": 1},
        "Only jobs whose payload's operation is this.",
    ),
    _query(
        "since",
        {"type": "string", "format": "date-time"},
        "Only jobs created at or after this ISO-8601 time (zone-less: UTC).",
    ),
    _query(
        "until",
        {"type": "string", "format": "date-time"},
        "Only jobs created before this ISO-8601 time (zone-less: UTC).",
    ),
    _query(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
        "Most jobs in the page.",
    ),
    _query(
        "cursor",
        {"type": "string", "pattern": CURSOR_PATTERN},
        "The previous page's next_cursor (opaque).",
    ),
    _query(
        "order",
        {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
        "By creation time: asc (oldest first) or desc.",
    ),
]


def _schemas(*models: type[BaseModel]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        for name, sub in schema.pop("$defs", {}).items():
            out[name] = sub
        out[model.__name__] = schema
    return out


def _rehome_refs(schema: Any) -> Any:
    """``#/$defs/X`` references (pydantic's default) pointed at the components."""
    if isinstance(schema, dict):
        return {
            key: _REF.format(model=value.removeprefix("#/$defs/"))
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/")
            else _rehome_refs(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_rehome_refs(item) for item in schema]
    return schema


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


def _json_content(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _json_content("ErrorBody")}


_SIGNAL_OR_JSON = r"^(\{[\s\S]*\}|\[DONE\]|\[CANCELLED\]|\[ERROR\]( [\s\S]*)?)$"

_SSE = {
    "text/event-stream": {
        # OpenAPI 3.2 names this itemSchema; on 3.1 tools read ``schema`` as one event.
        "schema": {
            "description": (
                "One event of the stream: `retry: 2000` first, then per event `id: <n>` + "
                "`data: <event JSON>`, then the terminal signal `data: [DONE]` | "
                "`data: [ERROR] <msg>` | `data: [CANCELLED]` with its own id; "
                "`: keep-alive` comments while idle; then the body ends."
            ),
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "pattern": _SIGNAL_OR_JSON,
                    "description": "An event as JSON, or the terminal signal.",
                },
                "id": {"type": "string", "pattern": "^[0-9]+$"},
                "event": {"type": "string", "const": "message"},
                "retry": {"type": "integer", "minimum": 0},
            },
        },
    }
}

_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "minLength": 1},
}
_LAST_EVENT_ID = [
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"},
        "description": "Resume after this event id (no gap, no duplicate); empty: from "
        "the start. Wins over last_event_id when both are given.",
    },
    {
        "name": "last_event_id",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
        "description": "Same as the Last-Event-ID header, for clients that cannot set it.",
    },
]


def openapi_document(
    *,
    title: str = "trio-jobs",
    version: str = "1",
    payload_schema: Mapping[str, Any] | None = None,
    token: bool = False,
) -> dict[str, Any]:
    """The OpenAPI document served at ``/openapi.json``.

    Args:
        title: the API title (the server's name).
        version: the document's ``info.version``.
        payload_schema: JSON schema of the operation part of a POST body (its ``$defs``
            are moved to the components); default: any JSON object.
        token: whether routes require a bearer token (adds the security scheme).
    """
    components = _schemas(
        JobOptions, ErrorBody, CreatedBody, JobRecordBody, JobListBody, HistoryBody
    )
    payload: dict[str, Any] = (
        copy.deepcopy(dict(payload_schema)) if payload_schema is not None else {"type": "object"}
    )
    for name, sub in payload.pop("$defs", {}).items():
        components[name] = sub
    payload = _rehome_refs(payload)
    for name in list(components):
        components[name] = _rehome_refs(components[name])
    options = copy.deepcopy(components["JobOptions"])
    submit_schema = {
        "description": "An operation (the job's payload) with optional job options at the "
        "top level; the options are removed before the rest becomes the payload.",
        "allOf": [payload, {"type": "object", "properties": options["properties"]}],
    }
    components["SubmitBody"] = submit_schema
    unauthorized = {"401": _error("Missing or wrong bearer token.")} if token else {}
    cross_site = {
        "403": _error("A foreign Origin: neither the server's own nor an allowed one."),
        "421": _error("A loopback server asked for a Host name that is not its own."),
    }

    def op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "summary": summary,
            "responses": {**responses, **unauthorized, **cross_site},
        }
        body.update(extra)
        return body

    paths: dict[str, Any] = {
        "/v1/jobs": {
            "post": op(
                "Submit a job",
                {
                    "201": {
                        "description": "Created; stream it at sse_url or ws_url.",
                        "content": _json_content("CreatedBody"),
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "links": {
                            name: {
                                "operationId": operation,
                                "parameters": {"job_id": "$response.body#/job_id"},
                            }
                            for name, operation in (
                                ("GetJob", "getJob"),
                                ("StreamJob", "streamJob"),
                                ("JobHistory", "jobHistory"),
                                ("CancelJob", "cancelJob"),
                            )
                        },
                    },
                    "200": {
                        "description": "With `Accept: text/event-stream`: the new job's "
                        "stream, its id in the X-Job-Id header.",
                        "content": _SSE,
                        "headers": {"X-Job-Id": {"schema": {"type": "string"}}},
                    },
                    "400": _error("Malformed JSON, or not UTF-8 (a byte order mark, UTF-16)."),
                    "413": _error("Body over the size limit."),
                    "415": _error("Not Content-Type: application/json."),
                    "422": _error("Invalid option or operation; detail names the field."),
                },
                operationId="submitJob",
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubmitBody")}},
                },
            ),
            "get": op(
                "List jobs",
                {
                    "200": {
                        "description": "A page of the stored jobs (also those retention "
                        "dropped from memory), oldest first unless order=desc; pass "
                        "next_cursor as cursor for the next page.",
                        "content": _json_content("JobListBody"),
                    },
                    "422": _error("A bad parameter (named in the detail)."),
                    "503": _error("The job store cannot answer."),
                },
                operationId="listJobs",
                parameters=_LIST_PARAMETERS,
            ),
        },
        "/v1/jobs/{job_id}": {
            "get": op(
                "A job's record",
                {
                    "200": {
                        "description": "The record.",
                        "content": _json_content("JobRecordBody"),
                    },
                    "404": _error("Unknown job."),
                },
                operationId="getJob",
                parameters=[_JOB_ID],
            ),
            "delete": op(
                "Cancel a job",
                {
                    "200": {
                        "description": "Cancelled; the record.",
                        "content": _json_content("JobRecordBody"),
                    },
                    "400": _error("A DELETE with a body."),
                    "404": _error("Unknown job."),
                    "409": _error("The job already finished (or is being cancelled)."),
                    "415": _error("A Content-Type other than application/json."),
                },
                operationId="cancelJob",
                parameters=[_JOB_ID],
            ),
        },
        "/v1/jobs/{job_id}/stream": {
            "get": op(
                "A job's events as Server-Sent Events",
                {
                    "200": {"description": "The stream.", "content": _SSE},
                    "204": {
                        "description": "A resume (Last-Event-ID or last_event_id) at or after "
                        "the terminal signal of a finished job: the stream is over."
                    },
                    "404": _error("Unknown job."),
                    "422": _error("Bad Last-Event-ID or last_event_id."),
                },
                operationId="streamJob",
                parameters=[_JOB_ID, *_LAST_EVENT_ID],
            )
        },
        "/v1/jobs/{job_id}/ws": {
            "get": op(
                "A job's lines over a WebSocket",
                {
                    "101": {
                        "description": "Switching protocols: one text message per line "
                        "(event JSON, then the signal); the client may send "
                        '`{"cancel": true}`; closed with 1000 after the signal.'
                    },
                    "404": _error("Unknown job (the handshake is refused)."),
                    "422": _error("Bad Last-Event-ID (the handshake is refused)."),
                    "426": _error("A plain HTTP request: this endpoint needs the handshake."),
                },
                operationId="streamJobWebSocket",
                parameters=[_JOB_ID, *_LAST_EVENT_ID],
            )
        },
        "/v1/jobs/{job_id}/history": {
            "get": op(
                "A job's state transitions",
                {
                    "200": {"description": "The history.", "content": _json_content("HistoryBody")},
                    "404": _error("Unknown job."),
                },
                operationId="jobHistory",
                parameters=[_JOB_ID],
            )
        },
        "/health": {
            "get": {
                "summary": "Liveness (no auth)",
                "operationId": "health",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Alive.",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": {"type": "string"}},
                                    "required": ["status"],
                                }
                            }
                        },
                    }
                },
            }
        },
        "/metrics": {
            "get": op(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                operationId="metrics",
            )
        },
        "/openapi.json": {
            "get": op(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                operationId="openapi",
            )
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }
    if token:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
