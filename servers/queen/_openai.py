"""The queen's OpenAI-compatible API (SPEC §8): models, chat, completions, responses.

Every generation request is an ``infer`` job of the queen's own registry, submitted
durably (the job is stored before anything is answered), so it is listed, followed and
cancelled through ``/v1/jobs`` like any other job. The response ``id`` carries the job id
(``chatcmpl-<job id>``, ``cmpl-<job id>``, ``resp_<job id>``) and the ``X-Job-Id`` header
names it. What the worker says (``token`` and ``infer_complete`` events, re-narrated into
the queen's job) is translated into OpenAI's shapes:

* chat and completions: one JSON object, or ``chat.completion.chunk`` / ``text_completion``
  SSE chunks (role first, content deltas, ``finish_reason``, the usage chunk when asked),
  then ``data: [DONE]``. A failure after the stream started is an OpenAI error object and
  the end of the body, never ``[DONE]``. A client that goes away cancels the job, which
  cancels the worker's job and its generation.
* responses: the typed events (``response.created`` ... ``response.completed`` /
  ``failed`` / ``incomplete``) are derived from the job's stored events, so a stream is
  resumable by ``sequence_number`` from the store, also after a queen restart. The
  sequence number is ``4 * <job event id> + k``: the events derived from job event ``e``
  get ``4e .. 4e+3`` (the opening events belong to ``e = 0``, the closing ones to the
  terminal signal's id), so resuming after ``N`` needs only the job's events.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the statuses the SDKs
map to their exceptions: 400 bad request (``tools`` included: no backend calls tools), 401
without the queen's token (the API key), 404 unknown model or response, 409 a job
cancelled elsewhere, 413/415 as the job API, 429 (``Retry-After``) every worker of the
model stayed at its capacity for the queen's ``schedule_wait_s``, 502 the worker failed
before answering, 503 (``Retry-After``) no worker or store could take the request.

A background response (an ``infer`` job with ``background`` set) is ``queued`` until a
worker takes it: it waits for a slot (in turn) instead of failing after
``schedule_wait_s``, and its stream says ``response.in_progress`` when a worker took it.
It ends ``failed`` at the queen's ``background_timeout_s`` (its job's timeout) after its
creation, whether it was running or still queued, across queen restarts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from quart import Response, request

from trio_jobs import (
    JobNotFound,
    JobState,
    NarrationEvent,
    Signal,
    StoreUnavailable,
    StreamItem,
    TerminalSignal,
    timeout_message,
)
from trio_jobs.http import (
    SSE_HEADERS,
    Answer,
    ApiError,
    JobService,
    add_fast_route,
    answer_response,
    job_service,
    on_request_end,
    read_body,
)

from .._openai_wire import (
    DONE_FRAME,
    TOKEN,
    chat_chunk,
    error_object,
    frame_template,
    message_text,
    render_messages,
    sse_frame,
    text_chunk,
    usage_object,
)
from ..operations import Infer
from ._scheduler import NoWorker

if TYPE_CHECKING:
    from trio_jobs import JobStream

    from ._server import Queen

__all__ = ["OpenAIError", "add_openai_routes", "response_events"]

CHAT_DEFAULT_MAX_TOKENS = 256
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for ``/v1/completions``."""

_OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/responses")
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "requests",
}
"""Error types by status; 429 as OpenAI's request-rate limit answers (code
``rate_limit_exceeded``)."""


class OpenAIError(Exception):
    """Raise in an OpenAI route to answer ``status`` with an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_object(self.message, self.error_type, param=self.param, code=self.code)

    def answer(self) -> Answer:
        headers = [("Content-Type", "application/json"), *self.headers.items()]
        return Answer(self.status, headers, json.dumps(self.body()).encode())


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _ERROR_TYPES.get(status, "invalid_request_error")


def _param(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic location as OpenAI names a parameter: ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            out += f".{part}"
    return out


def _invalid(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    where = _param(first.get("loc", ()))
    message = str(first.get("msg", "invalid value"))
    return OpenAIError(
        400,
        f"{where}: {message}" if where else message,
        param=where or None,
        code="invalid_value" if where else None,
    )


_NO_TOOL = (None, "none", "auto")
"""``tool_choice`` / ``function_call`` values that do not require a tool."""


def _refuse_tools(body: Mapping[str, Any]) -> None:
    """400 for a request that asks for tools: no backend here can call one, and a tool
    silently dropped would leave the client waiting for a call that never comes."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise OpenAIError(
                400,
                f"Unsupported parameter: {name!r}: tools are not supported by this server "
                "(its backends generate text only)",
                param=name,
                code="unsupported_parameter",
            )
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in _NO_TOOL:
            raise OpenAIError(
                400,
                f"Unsupported value: {name!r} requires a tool, and tools are not supported "
                "by this server",
                param=name,
                code="unsupported_value",
            )


# ---- request bodies ------------------------------------------------------------------


class _Lenient(BaseModel):
    """Unknown fields are ignored, as OpenAI does; known ones are validated."""

    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


def _stops(value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else value


class _Sampling(_Lenient):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    user: str | None = None


class _Generate(_Sampling):
    max_tokens: int | None = Field(default=None, ge=1, le=100_000)
    stop: str | list[str] | None = None
    n: Literal[1] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = _stops(value)
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("up to 4 non-empty stop strings")
        return value


class ChatRequest(_Generate):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=100_000)


class CompletionRequest(_Generate):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported")
        return value


class InputMessage(_Lenient):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ResponsesRequest(_Sampling):
    input: str | list[InputMessage]
    instructions: str | None = None
    stream: bool | None = False
    background: bool | None = False
    max_output_tokens: int | None = Field(default=None, ge=1, le=100_000)
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, value: str | None) -> None:
        if value is not None:
            raise ValueError("not supported: send the whole conversation as input")
        return None


# ---- what a job said so far ------------------------------------------------------------


@dataclass
class Progress:
    """The generation as the job's events tell it: token texts, finish, usage, outcome."""

    prompt: str = ""
    parts: list[str] = field(default_factory=list)
    finish: str | None = None
    prompt_tokens: int | None = None
    scheduled: bool = False
    """A worker accepted the job (its ``forward`` event)."""
    busy: bool = False
    """Not scheduled because every worker of the model stayed at its capacity."""
    unscheduled: str | None = None
    """Why no worker took the job, as its ``infer_unscheduled`` event said."""
    signal: TerminalSignal | None = None
    last_id: int = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def done(self) -> bool:
        return self.signal is not None

    @property
    def started(self) -> bool:
        """A worker took the job (or tokens came, should that event be lost)."""
        return self.scheduled or bool(self.parts)

    def feed(self, item: StreamItem) -> str | None:
        """Take one stream item; returns the token text it carries, if any."""
        if type(item) is TerminalSignal:
            self.signal = item
            return None
        assert isinstance(item, NarrationEvent)
        self.last_id = item.id
        action = item.action
        if action == "token":
            token = str(item.fields.get("token", item.human))
            self.parts.append(token)
            return token
        if action == "forward":  # a worker accepted the job
            self.scheduled = True
        elif action == "infer_unscheduled":
            self.busy = bool(item.fields.get("busy"))
            self.unscheduled = item.human
        elif action == "infer_complete":
            self.finish = str(item.fields.get("finish_reason") or "stop")
            prompt_tokens = item.fields.get("prompt_tokens")
            if isinstance(prompt_tokens, int):
                self.prompt_tokens = prompt_tokens
        return None

    def usage(self) -> dict[str, int]:
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = len(self.prompt.split())
        return usage_object(prompt, len(self.parts))

    def finish_reason(self) -> str:
        return self.finish or "stop"

    def failure(self, job_id: str) -> OpenAIError:
        """The HTTP error of job ``job_id`` that did not complete (its signal is not
        ``[DONE]``); its ``X-Job-Id`` header names the job."""
        signal = self.signal
        assert signal is not None
        named = {"X-Job-Id": job_id}
        retry = {**named, "Retry-After": "1"}
        if signal.signal is Signal.CANCELLED:
            return OpenAIError(
                409, "the job was cancelled before it finished", code="cancelled", headers=named
            )
        message = signal.message or "the job failed"
        if not self.scheduled and self.busy:
            return OpenAIError(
                429,
                f"Rate limit reached: {message}; retry shortly",
                code="rate_limit_exceeded",
                headers=retry,
            )
        if not self.scheduled:
            return OpenAIError(
                503,
                f"no worker could take the request: {message}",
                code="no_worker_available",
                headers=retry,
            )
        return OpenAIError(502, f"the worker failed: {message}", code="worker_error", headers=named)

    def stream_error(self) -> dict[str, Any]:
        """The error object that ends a stream whose job did not complete."""
        signal = self.signal
        assert signal is not None
        if signal.signal is Signal.CANCELLED:
            return error_object("the job was cancelled", "server_error", code="cancelled")
        return error_object(
            signal.message or "the job failed", "server_error", code="generation_failed"
        )


# ---- the Responses API's typed events ------------------------------------------------


_SIGNAL_OF_STATE = {
    JobState.COMPLETED: Signal.DONE,
    JobState.FAILED: Signal.ERROR,
    JobState.CANCELLED: Signal.CANCELLED,
}


def _seq(event_id: int, k: int) -> int:
    return 4 * event_id + k


@dataclass
class ResponseView:
    """One response as stored: its job's metadata and record, and what it generated."""

    response_id: str
    meta: Mapping[str, Any]
    created_at: float
    progress: Progress
    error: str | None = None
    finished_at: float | None = None

    @property
    def item_id(self) -> str:
        return "msg_" + self.response_id.removeprefix("resp_")

    def status(self) -> str:
        signal = self.progress.signal
        if signal is not None:
            if signal.signal is Signal.DONE:
                return "incomplete" if self.progress.finish == "length" else "completed"
            return "cancelled" if signal.signal is Signal.CANCELLED else "failed"
        return "in_progress" if self.progress.started else "queued"

    def failure_detail(self) -> dict[str, str]:
        """The ``error`` of a failed response, with a code from OpenAI's reference."""
        message = self.error or "the job failed"
        progress = self.progress
        busy = progress.busy and not progress.scheduled
        bound = self.meta.get("timeout_s")
        if isinstance(bound, int | float) and message == timeout_message(bound):
            limit = f"within {bound:g}s, this server's limit for background responses"
            if progress.started:
                message = f"The response did not finish {limit} (background_timeout_s)"
            else:
                why = f": {progress.unscheduled}" if progress.unscheduled else ""
                message = f"The response was not started {limit} (background_timeout_s){why}"
        if busy:
            return {"code": "rate_limit_exceeded", "message": message}
        return {"code": "server_error", "message": message}

    def content_part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, status: str) -> dict[str, Any]:
        text = self.progress.text
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [self.content_part(text)] if text or status != "in_progress" else [],
        }

    def obj(self, status: str | None = None) -> dict[str, Any]:
        """The ``response`` object (``status`` overrides the current one)."""
        status = status or self.status()
        progress = self.progress
        finished = status in ("completed", "incomplete", "failed", "cancelled")
        output: list[dict[str, Any]] = []
        if progress.parts or status in ("completed", "incomplete"):
            item_status = "completed" if status == "completed" else "incomplete"
            output.append(self.item(item_status if finished else "in_progress"))
        usage = progress.usage()
        error = self.failure_detail() if status == "failed" else None
        meta = self.meta
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": int(self.created_at),
            "completed_at": int(self.finished_at)
            if status == "completed" and self.finished_at
            else None,
            "status": status,
            "background": bool(meta.get("background")),
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": meta.get("instructions"),
            "max_output_tokens": meta.get("max_output_tokens"),
            "metadata": meta.get("user_metadata") or {},
            "model": meta.get("model"),
            "output": output,
            "parallel_tool_calls": False,
            "temperature": meta.get("temperature"),
            "top_p": meta.get("top_p"),
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"],
            }
            if finished
            else None,
            "user": meta.get("user"),
        }


def _start_events(view: ResponseView, event_id: int) -> list[dict[str, Any]]:
    """``response.in_progress`` and the empty output item and part, numbered after the
    job event ``event_id`` that started the response."""
    return [
        {
            "type": "response.in_progress",
            "sequence_number": _seq(event_id, 1),
            "response": view.obj("in_progress"),
        },
        {
            "type": "response.output_item.added",
            "sequence_number": _seq(event_id, 2),
            "output_index": 0,
            "item": view.item("in_progress"),
        },
        {
            "type": "response.content_part.added",
            "sequence_number": _seq(event_id, 3),
            "item_id": view.item_id,
            "output_index": 0,
            "content_index": 0,
            "part": view.content_part(""),
        },
    ]


def response_events(view: ResponseView, item: StreamItem | None) -> list[dict[str, Any]]:
    """The typed events one stream item of the response's job stands for, each with its
    ``sequence_number``: ``None`` gives the opening events. ``view.progress`` is fed
    the item first (so the events see what it added).

    A foreground response opens ``in_progress`` (``response.created`` to
    ``response.content_part.added``); a background one opens ``queued``
    (``response.created`` alone) and the rest follows when a worker accepts its job (the
    job's ``forward`` event), so a stream says ``response.in_progress`` when it is.
    """
    background = bool(view.meta.get("background"))
    if item is None:
        opening = view.obj("queued" if background else "in_progress")
        created = {"type": "response.created", "sequence_number": 0, "response": opening}
        return [created] if background else [created, *_start_events(view, 0)]
    progress = view.progress
    was_scheduled = progress.scheduled
    token = progress.feed(item)
    if background and progress.scheduled and not was_scheduled:
        assert isinstance(item, NarrationEvent)
        return _start_events(view, item.id)
    if token is not None:
        assert isinstance(item, NarrationEvent)
        return [
            {
                "type": "response.output_text.delta",
                "sequence_number": _seq(item.id, 0),
                "item_id": view.item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": token,
                "logprobs": [],
            }
        ]
    if not isinstance(item, TerminalSignal):
        if item.action == "events_lost":  # a crash lost these ids: say so, in place
            return [
                {
                    "type": "error",
                    "sequence_number": _seq(item.id, 0),
                    "code": "events_lost",
                    "message": item.human,
                    "param": None,
                }
            ]
        return []
    end = item.id if item.id is not None else progress.last_id + 1
    status = view.status()
    if status in ("failed", "cancelled"):
        if item.signal is Signal.ERROR:
            view.error = item.message
        return [
            {"type": "response.failed", "sequence_number": _seq(end, 3), "response": view.obj()}
        ]
    text = progress.text
    item_status = "completed" if status == "completed" else "incomplete"
    base = {"item_id": view.item_id, "output_index": 0, "content_index": 0}
    return [
        {
            "type": "response.output_text.done",
            "sequence_number": _seq(end, 0),
            **base,
            "text": text,
            "logprobs": [],
        },
        {
            "type": "response.content_part.done",
            "sequence_number": _seq(end, 1),
            **base,
            "part": view.content_part(text),
        },
        {
            "type": "response.output_item.done",
            "sequence_number": _seq(end, 2),
            "output_index": 0,
            "item": view.item(item_status),
        },
        {"type": f"response.{status}", "sequence_number": _seq(end, 3), "response": view.obj()},
    ]


# ---- the routes ---------------------------------------------------------------------------


def _parse_json(body: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    if not body.strip():
        raise OpenAIError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise OpenAIError(400, f"the body is not valid JSON: {str(exc)[:300]}") from None


_SSE_HEADERS = list(SSE_HEADERS.items())


def _sse_response(body: AsyncIterator[bytes], job_id: str) -> Answer:
    """A stream answer; its first chunk must come at once (it carries the head)."""
    return Answer(200, [*_SSE_HEADERS, ("X-Job-Id", job_id)], body)


def _json_response(data: Any, job_id: str | None = None) -> Answer:
    headers = [("Content-Type", "application/json")]
    if job_id is not None:
        headers.append(("X-Job-Id", job_id))
    return Answer(200, headers, json.dumps(data).encode())


@dataclass
class _Watch:
    """A job followed by one request; ``finished`` once its terminal signal was read."""

    job_id: str
    stream: JobStream
    finished: bool = False


class OpenAIApi:
    """The OpenAI routes of one queen (see the module docstring)."""

    def __init__(self, queen: Queen, service: JobService) -> None:
        self.queen = queen
        self.service = service
        self.registry = queen.registry
        self.started = int(time.time())
        self.born = trio.current_time()

    # ---- helpers ------------------------------------------------------------------------

    async def _read_body(self, chunks: AsyncIterable[bytes], declared: int | None) -> bytes:
        """The POST body, read by the job API's own reader (its ``max_body_bytes``, 1 MiB;
        the drain of an oversized body; the 60 s bound), its 413/408 as OpenAI errors."""
        try:
            return await read_body(self.service, chunks, declared)
        except ApiError as exc:
            too_big = exc.status == 413
            raise OpenAIError(
                exc.status,
                f"the request body is too large: {exc.detail}" if too_big else str(exc.detail),
                code="request_too_large" if too_big else None,
                headers=exc.headers,
            ) from None

    async def _body(self, chunks: AsyncIterable[bytes], declared: int | None) -> dict[str, Any]:
        data = _parse_json(await self._read_body(chunks, declared))
        if not isinstance(data, dict):
            raise OpenAIError(400, "the body must be a JSON object")
        return data

    def _models(self) -> list[str]:
        return sorted({entry.model for entry in self.queen.workers.live()})

    async def _check_model(self, model: str) -> None:
        """404 unless a live worker serves ``model``. A queen that just started waits
        (up to one heartbeat TTL from its start) for its workers to report first."""
        if model in self._models():
            return
        grace = self.queen.config.heartbeat_ttl_s - (trio.current_time() - self.born)
        if grace > 0:
            with contextlib.suppress(NoWorker):
                await self.queen.workers.pick(model, None, grace)
        models = self._models()
        if model not in models:
            raise OpenAIError(
                404,
                f"The model {model!r} does not exist or no live worker serves it "
                f"(live models: {', '.join(models) or 'none'})",
                param="model",
                code="model_not_found",
            )

    async def _submit(
        self, infer: Infer, kind: str, metadata: dict[str, Any], timeout: float | None = None
    ) -> str:
        await self._check_model(infer.model)
        try:
            return await self.registry.submit(
                infer.to_body(),
                tags={"openai": kind},
                metadata={"openai": kind, **metadata},
                timeout=timeout,
            )
        except StoreUnavailable as exc:
            raise OpenAIError(
                503, f"the job store is unavailable: {exc}", headers={"Retry-After": "1"}
            ) from None

    def _watch(self, job_id: str, scope: Any, *, cancel_on_disconnect: bool) -> _Watch:
        """Follow ``job_id`` for the request of ``scope``; with ``cancel_on_disconnect`` the job is
        cancelled when the request ends (however) before the job's signal was read."""
        watch = _Watch(job_id, self.registry.open_stream(job_id))
        service = self.service
        if cancel_on_disconnect:
            service.mark_cancel_on_disconnect(job_id)
        service.stream_opened(job_id)

        def close() -> None:
            watch.stream.close()
            service.stream_closed(job_id, abandoned=not watch.finished)

        on_request_end(scope, close)
        return watch

    async def _read(self, watch: _Watch, progress: Progress) -> list[str]:
        """Wait for what the job says next; returns the new token texts (may be empty
        when only other events or the signal came). Ends the wait at the keep-alive
        period (empty list) so streams can write a keep-alive."""
        stream = watch.stream
        items = stream.receive_batch(self.service.batch_limit)
        if not items:
            deadline = trio.current_time() + self.service.keepalive_s
            if not await self.service.wait_ready(stream, deadline):
                return []
            items = stream.receive_batch(self.service.batch_limit)
        tokens = []
        for item in items:
            token = progress.feed(item)
            if token is not None:
                tokens.append(token)
        if progress.done:
            watch.finished = True
        return tokens

    async def _until_first_token(self, watch: _Watch, progress: Progress) -> list[str]:
        """Wait for the first token or the end: a request that fails before it gets an
        error status instead of a stream."""
        tokens: list[str] = []
        while not tokens and not progress.done and progress.finish is None:
            if self.service.drain_expired():
                raise OpenAIError(503, "the server is shutting down", headers={"Retry-After": "1"})
            tokens = await self._read(watch, progress)
        return tokens

    async def _until_done(self, watch: _Watch, progress: Progress) -> None:
        while not progress.done:
            if self.service.drain_expired():
                raise OpenAIError(503, "the server is shutting down", headers={"Retry-After": "1"})
            await self._read(watch, progress)

    # ---- models ---------------------------------------------------------------------------

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started, "owned_by": "trio-jobs"}

    async def list_models(self) -> Answer:
        return _json_response({"object": "list", "data": [self._model(m) for m in self._models()]})

    async def get_model(self, model: str) -> Answer:
        await self._check_model(model)
        return _json_response(self._model(model))

    # ---- chat and completions ---------------------------------------------------------------

    async def chat_completions(
        self, scope: Any, chunks: AsyncIterable[bytes], declared: int | None
    ) -> Answer:
        body = await self._body(chunks, declared)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as exc:
            raise _invalid(exc) from None
        _refuse_tools(body)
        # Validated, then passed on as sent (fields we do not model, e.g. tool calls,
        # reach an OpenAI-compatible upstream unchanged).
        raw = body["messages"]
        messages = [dict(m) for m in raw] if isinstance(raw, list) else []
        max_tokens = req.max_completion_tokens or req.max_tokens or CHAT_DEFAULT_MAX_TOKENS
        infer = self._infer(req, render_messages(messages), max_tokens, messages=messages)
        return await self._generate(req, infer, "chat", scope)

    async def completions(
        self, scope: Any, chunks: AsyncIterable[bytes], declared: int | None
    ) -> Answer:
        try:
            req = CompletionRequest.model_validate(await self._body(chunks, declared))
        except ValidationError as exc:
            raise _invalid(exc) from None
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        infer = self._infer(req, prompt, req.max_tokens or COMPLETION_DEFAULT_MAX_TOKENS)
        return await self._generate(req, infer, "completion", scope)

    def _infer(
        self,
        req: _Sampling,
        prompt: str,
        max_tokens: int,
        *,
        messages: list[dict[str, Any]] | None = None,
        stop: list[str] | None = None,
        background: bool = False,
    ) -> Infer:
        fields: dict[str, Any] = {
            "background": background,
            "model": req.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "messages": messages,
            "seed": req.seed,
            "stop": _stops(getattr(req, "stop", None)) if stop is None else stop,
        }
        if req.temperature is not None:
            fields["temperature"] = float(req.temperature)
        if req.top_p is not None:
            fields["top_p"] = float(req.top_p)
        try:
            return Infer.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            raise _invalid(exc) from None

    async def _generate(self, req: _Generate, infer: Infer, kind: str, scope: Any) -> Answer:
        chat = kind == "chat"
        job_id = await self._submit(infer, kind, {"model": req.model, "user": req.user})
        watch = self._watch(job_id, scope, cancel_on_disconnect=True)
        created = int(time.time())
        response_id = ("chatcmpl-" if chat else "cmpl-") + job_id
        progress = Progress(prompt=infer.prompt)
        model = req.model
        if not req.stream:
            await self._until_done(watch, progress)
            signal = progress.signal
            assert signal is not None
            if signal.signal is not Signal.DONE:
                raise progress.failure(job_id)
            choice: dict[str, Any] = {"index": 0, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": progress.text, "refusal": None}
            else:
                choice["text"] = progress.text
            choice["finish_reason"] = progress.finish_reason()
            body = {
                "id": response_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [choice],
                "usage": progress.usage(),
            }
            return _json_response(body, job_id)

        # The frames are made before the wait: the first token goes out as soon as it comes.
        with_usage = bool(req.stream_options and req.stream_options.include_usage)
        if chat:
            delta = frame_template(
                chat_chunk(response_id, created, model, {"content": TOKEN}, with_usage=with_usage)
            )
            head = sse_frame(
                chat_chunk(
                    response_id,
                    created,
                    model,
                    {"role": "assistant", "content": ""},
                    with_usage=with_usage,
                )
            )

            def finish(reason: str) -> bytes:
                return sse_frame(chat_chunk(response_id, created, model, {}, reason))

            def usage_frame() -> bytes:
                return sse_frame(chat_chunk(response_id, created, model, None, usage=usage))

        else:
            delta = frame_template(
                text_chunk(response_id, created, model, TOKEN, with_usage=with_usage)
            )
            head = b""

            def finish(reason: str) -> bytes:
                return sse_frame(text_chunk(response_id, created, model, "", reason))

            def usage_frame() -> bytes:
                return sse_frame(text_chunk(response_id, created, model, None, usage=usage))

        usage: dict[str, int] = {}

        def ending() -> bytes:
            signal = progress.signal
            assert signal is not None
            if signal.signal is not Signal.DONE:
                return sse_frame(progress.stream_error())
            out = finish(progress.finish_reason())
            if with_usage:
                usage.update(progress.usage())
                out += usage_frame()
            return out + DONE_FRAME

        first = await self._until_first_token(watch, progress)
        signal = progress.signal
        if signal is not None and signal.signal is not Signal.DONE and not progress.parts:
            raise progress.failure(job_id)
        return _sse_response(self._chunks(watch, progress, head, first, delta, ending), job_id)

    async def _chunks(
        self,
        watch: _Watch,
        progress: Progress,
        head: bytes,
        first: list[str],
        delta: Callable[[str], bytes],
        ending: Callable[[], bytes],
    ) -> AsyncIterator[bytes]:
        out = head + b"".join(map(delta, first))
        while True:
            if progress.done:
                yield out + ending()
                return
            if out:
                yield out
                out = b""
            if self.service.drain_expired():
                yield sse_frame(error_object("the server is shutting down", "server_error"))
                return
            tokens = await self._read(watch, progress)
            if tokens:
                out = b"".join(map(delta, tokens))
            elif not progress.done and not self.service.drain_expired():
                out = b": keep-alive\n"

    # ---- responses -------------------------------------------------------------------------

    def _job_of(self, response_id: str) -> str:
        if not response_id.startswith("resp_") or len(response_id) > 210:
            raise OpenAIError(404, f"No response found with id {response_id!r}", code="not_found")
        return response_id.removeprefix("resp_")

    async def _view(self, response_id: str) -> ResponseView:
        """A stored response (404 when there is none), its progress fed from its events."""
        job_id = self._job_of(response_id)
        await self.service.known(job_id)
        try:
            record = self.registry.get(job_id)
        except JobNotFound:
            raise OpenAIError(
                404, f"No response found with id {response_id!r}", code="not_found"
            ) from None
        meta = record.metadata if isinstance(record.metadata, dict) else {}
        if meta.get("openai") != "response":
            raise OpenAIError(404, f"No response found with id {response_id!r}", code="not_found")
        payload = record.payload if isinstance(record.payload, dict) else {}
        view = ResponseView(
            response_id,
            meta,
            record.created_at,
            Progress(prompt=str(payload.get("prompt", ""))),
            error=record.error,
            finished_at=record.finished_at,
        )
        for event in self.registry.events(job_id):
            view.progress.feed(event)
        if record.state.is_terminal:
            view.progress.signal = TerminalSignal(_SIGNAL_OF_STATE[record.state], record.error)
        return view

    async def create_response(
        self, scope: Any, chunks: AsyncIterable[bytes], declared: int | None
    ) -> Answer:
        body = await self._body(chunks, declared)
        try:
            req = ResponsesRequest.model_validate(body)
        except ValidationError as exc:
            raise _invalid(exc) from None
        _refuse_tools(body)
        messages: list[dict[str, Any]] = []
        if req.instructions:
            messages.append({"role": "system", "content": req.instructions})
        if isinstance(req.input, str):
            messages.append({"role": "user", "content": req.input})
        else:
            messages += [{"role": m.role, "content": message_text(m.content)} for m in req.input]
        max_tokens = req.max_output_tokens or CHAT_DEFAULT_MAX_TOKENS
        infer = self._infer(
            req,
            render_messages(messages),
            max_tokens,
            messages=messages,
            background=bool(req.background),
        )
        meta = {
            "model": req.model,
            "instructions": req.instructions,
            "background": bool(req.background),
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "user": req.user,
            "user_metadata": req.metadata,
        }
        timeout = None
        if req.background:  # nobody waits on it: bounded here (from its creation)
            timeout = meta["timeout_s"] = self.queen.config.background_timeout_s
        job_id = await self._submit(infer, "response", meta, timeout)
        response_id = "resp_" + job_id
        meta["openai"] = "response"
        created_at = self.registry.get(job_id).created_at
        view = ResponseView(response_id, meta, created_at, Progress(prompt=infer.prompt))
        if req.background and not req.stream:
            return _json_response(view.obj("queued"), job_id)
        watch = self._watch(job_id, scope, cancel_on_disconnect=not req.background)
        if not req.stream:
            await self._until_done(watch, view.progress)
            assert view.progress.signal is not None
            if view.progress.signal.signal is not Signal.DONE:
                raise view.progress.failure(job_id)
            view.finished_at = time.time()
            return _json_response(view.obj(), job_id)
        early: list[StreamItem] = []
        if not req.background:
            # As for chat: a request that fails before its first token (no worker could
            # take it, the worker refused it) is an error status, not a stream.
            early = await self._until_started(watch)
            probe = Progress(prompt=infer.prompt)
            for item in early:
                probe.feed(item)
            signal = probe.signal
            if signal is not None and signal.signal is not Signal.DONE and not probe.parts:
                raise probe.failure(job_id)
        return _sse_response(self._typed_events(watch, view, -1, early), job_id)

    async def _until_started(self, watch: _Watch) -> list[StreamItem]:
        """The job's items up to its first token or its end (whichever comes first),
        read but left for the stream to translate."""
        stream = watch.stream
        items: list[StreamItem] = []
        while True:
            if self.service.drain_expired():
                raise OpenAIError(503, "the server is shutting down", headers={"Retry-After": "1"})
            batch = stream.receive_batch(self.service.batch_limit)
            items += batch
            for item in batch:
                if isinstance(item, TerminalSignal) or item.action in ("token", "infer_complete"):
                    return items
            if not batch:
                deadline = trio.current_time() + self.service.keepalive_s
                await self.service.wait_ready(stream, deadline)

    async def _typed_events(
        self,
        watch: _Watch,
        view: ResponseView,
        after: int,
        early: list[StreamItem] | None = None,
    ) -> AsyncIterator[bytes]:
        """The response's typed events with a sequence number above ``after``, live until
        its job ends (a shutting-down server ends the body early: resume from the last).
        ``early``: items already read from the job's stream, translated first."""

        def frames(events: list[dict[str, Any]]) -> bytes:
            return b"".join(sse_frame(e, e["type"]) for e in events if e["sequence_number"] > after)

        out = frames(response_events(view, None))
        stream = watch.stream
        limit = self.service.batch_limit
        while True:
            items = early or stream.receive_batch(limit)
            early = None
            for item in items:
                out += frames(response_events(view, item))
            if view.progress.done:
                watch.finished = True
                yield out
                return
            if out:
                yield out
                out = b""
                continue
            if self.service.drain_expired():
                return
            deadline = trio.current_time() + self.service.keepalive_s
            if not await self.service.wait_ready(stream, deadline):
                if self.service.drain_expired():
                    return
                yield b": keep-alive\n"

    async def get_response(self, response_id: str) -> Answer:
        stream_arg = request.args.get("stream", "false").lower()
        if stream_arg not in ("true", "false", "1", "0"):
            raise OpenAIError(400, "stream must be true or false", param="stream")
        raw_after = request.args.get("starting_after")
        after = -1
        if raw_after is not None:
            if not raw_after.isdigit() or len(raw_after) > 18:
                raise OpenAIError(
                    400, "starting_after must be a non-negative integer", param="starting_after"
                )
            after = int(raw_after)
        view = await self._view(response_id)
        job_id = self._job_of(response_id)
        if stream_arg in ("false", "0"):
            return _json_response(view.obj(), job_id)
        fresh = ResponseView(
            response_id, view.meta, view.created_at, Progress(prompt=view.progress.prompt)
        )
        try:
            watch = self._watch(job_id, request.scope, cancel_on_disconnect=False)
        except JobNotFound:
            raise OpenAIError(404, f"No response found with id {response_id!r}") from None
        return _sse_response(self._typed_events(watch, fresh, after), job_id)

    async def cancel_response(self, response_id: str) -> Answer:
        job_id = self._job_of(response_id)
        view = await self._view(response_id)
        if not view.meta.get("background"):
            # As OpenAI answers: a foreground response ends with its request (closing
            # the stream cancels it).
            raise OpenAIError(400, "Only background responses can be cancelled.")
        if self.registry.cancel_job(job_id, "cancelled through the Responses API"):
            with trio.move_on_after(self.service.cancel_settle_s):
                await self.registry.wait(job_id)
        return _json_response((await self._view(response_id)).obj(), job_id)


def _is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in _OPENAI_PATHS)


def _openai_shape(status: int, body: bytes) -> bytes | None:
    """The job API's JSON error ``body`` as an OpenAI error object; None when it is not
    one of the job API's errors (already an OpenAI error, or not JSON)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or isinstance(data.get("error"), dict):
        return None
    detail = data.get("detail")
    message = str(data.get("error") or "error")
    if isinstance(detail, str) and detail:
        message = f"{message}: {detail}"
    elif detail:
        message = f"{message}: {json.dumps(detail)}"
    code = {401: "invalid_api_key", 413: "request_too_large", 415: "unsupported_media_type"}
    return json.dumps(error_object(message, _error_type(status), code=code.get(status))).encode()


class _OpenAIErrorShape:
    """ASGI middleware: on the OpenAI paths, the job API's own JSON errors (401 from its
    auth, 403 cross-site, 405, 413, 415...) become OpenAI error objects.

    Middleware rather than a Quart ``after_request`` hook or error handler: an app-wide
    hook turns off the job API's ASGI fast path (``DELETE /v1/jobs/{id}``) for the whole
    queen. Only error answers with a JSON body are held and rewritten; everything else
    (streams included) passes straight through.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _is_openai_path(scope["path"]):
            await self.inner(scope, receive, send)
            return
        held: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def shaping_send(message: Any) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                is_json = any(
                    k.lower() == b"content-type" and v.startswith(b"application/json")
                    for k, v in headers
                )
                if message["status"] >= 400 and is_json:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                body = _openai_shape(held["status"], body) or body
                headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                start, held = {**held, "headers": headers}, None
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.inner(scope, receive, shaping_send)


def _answered(route: Callable[..., Awaitable[Answer]]) -> Callable[..., Awaitable[Answer]]:
    """``route`` answering its :class:`OpenAIError` itself (no app-wide error handler,
    which would turn off the job API's fast path)."""

    @functools.wraps(route)
    async def answered(*args: Any, **kwargs: Any) -> Answer:
        try:
            return await route(*args, **kwargs)
        except OpenAIError as error:
            return error.answer()

    return answered


def _quart_view(route: Callable[..., Awaitable[Answer]]) -> Callable[..., Awaitable[Response]]:
    """The Quart view of ``route`` (an already :func:`_answered` one)."""

    async def view(*args: Any, **kwargs: Any) -> Response:
        return answer_response(await route(*args, **kwargs))

    return view


def _quart_post_view(
    route: Callable[[Any, AsyncIterable[bytes], int | None], Awaitable[Answer]],
) -> Callable[[], Awaitable[Response]]:
    """The Quart view of a ``POST`` route that the fast path also answers (the same
    ``route``, given what Quart read of the request)."""

    async def view() -> Response:
        return answer_response(await route(request.scope, request.body, request.content_length))

    return view


def add_openai_routes(app: Any, queen: Queen) -> OpenAIApi:
    """Mount the OpenAI-compatible API on the queen's ``app`` (which carries the job
    blueprint: its auth, cross-site rules and body limit apply to these routes too).

    Adds no Quart hook or error handler (see :class:`_OpenAIErrorShape`), so the job
    API's fast paths stay on; the ``POST`` routes are answered on that fast path too
    (``add_fast_route``), by the same functions, whenever Quart would run nothing else."""
    service = job_service(app)
    if service is None:
        raise RuntimeError("the OpenAI API needs the job blueprint mounted on the app")
    api = OpenAIApi(queen, service)
    routes: list[tuple[str, str, Callable[..., Awaitable[Answer]], str]] = [
        ("/v1/models", "openai_models", api.list_models, "GET"),
        ("/v1/models/<path:model>", "openai_model", api.get_model, "GET"),
        ("/v1/responses/<response_id>", "openai_response", api.get_response, "GET"),
        (
            "/v1/responses/<response_id>/cancel",
            "openai_response_cancel",
            api.cancel_response,
            "POST",
        ),
    ]
    for rule, endpoint, route, method in routes:
        app.add_url_rule(rule, endpoint, _quart_view(_answered(route)), methods=[method])
    posts = [
        ("/v1/chat/completions", "openai_chat", api.chat_completions),
        ("/v1/completions", "openai_completions", api.completions),
        ("/v1/responses", "openai_responses", api.create_response),
    ]
    for rule, endpoint, route in posts:
        answered = _answered(route)
        app.add_url_rule(rule, endpoint, _quart_post_view(answered), methods=["POST"])
        add_fast_route(app, "POST", rule, endpoint, answered)
    app.asgi_app = _OpenAIErrorShape(app.asgi_app)
    return api
