"""Job options of ``POST /v1/jobs`` and the JSON shapes of the API, as pydantic models.

The models validate requests (a wrong option is a 422 naming the field) and give the
OpenAPI document its schemas, so the document and the behaviour cannot drift apart.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .._models import MAX_RETRY_DELAY_S, Priority, RetryPolicy

__all__ = [
    "OPTION_KEYS",
    "CreatedBody",
    "ErrorBody",
    "HistoryBody",
    "JobListBody",
    "JobOptions",
    "JobRecordBody",
    "RetryOptions",
    "TransitionBody",
    "split_job_options",
]


def _integral(value: Any) -> Any:
    """A float with no fractional part is an integer in JSON Schema (``1.0`` is ``1``)."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)]
RetryDelay = Annotated[float, Field(ge=0, le=MAX_RETRY_DELAY_S, allow_inf_nan=False, strict=True)]


class RetryOptions(BaseModel):
    """How a failed job is retried (see ``trio_jobs.RetryPolicy``)."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: Annotated[int, Field(ge=1, le=1000, strict=True), BeforeValidator(_integral)] = 3
    backoff_base: RetryDelay = 1.0
    factor: Annotated[float, Field(ge=1, le=1000, allow_inf_nan=False, strict=True)] = 2.0
    cap: RetryDelay = 60.0
    jitter: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)] = 0.0
    retry_timeouts: Annotated[bool, Field(strict=True)] = False

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base=self.backoff_base,
            factor=self.factor,
            cap=self.cap,
            jitter=self.jitter,
            retry_timeouts=self.retry_timeouts,
        )


class JobOptions(BaseModel):
    """Options that may sit at the top level of a ``POST /v1/jobs`` body.

    They are taken out of the body before the rest becomes the job's payload.
    """

    model_config = ConfigDict(extra="forbid")

    timeout_s: PositiveSeconds | None = None
    priority: Literal["low", "normal", "high", "critical"] = "normal"
    retry: RetryOptions | None = None
    tags: dict[Annotated[str, Field(max_length=256)], Annotated[str, Field(strict=True)]] = Field(
        default_factory=dict, max_length=64
    )
    metadata: Any = None
    on_disconnect: Literal["detach", "cancel"] = "detach"
    expires_s: PositiveSeconds | None = None

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``JobRegistry.create_job``."""
        return {
            "timeout": self.timeout_s,
            "priority": Priority.parse(self.priority),
            "retry": self.retry.policy() if self.retry is not None else None,
            "tags": self.tags or None,
            "metadata": self.metadata,
            "expires": self.expires_s,
        }


OPTION_KEYS = frozenset(JobOptions.model_fields)
"""Top-level keys of a POST body that are job options, not payload."""


def split_job_options(body: dict[str, Any]) -> tuple[dict[str, Any], JobOptions]:
    """Split a ``POST /v1/jobs`` body into the payload (every other key) and its validated
    job options; ``body`` itself is left as it was.

    The one validation of job options: the job endpoint and the ``trio-jobs`` keeper
    (which checks what it is about to send) both call it.

    Raises:
        pydantic.ValidationError: an option is wrong; its ``loc`` is the option's key.
    """
    payload = {key: value for key, value in body.items() if key not in OPTION_KEYS}
    options = JobOptions.model_validate({k: v for k, v in body.items() if k in OPTION_KEYS})
    return payload, options


def non_finite_at(value: Any, path: tuple[str | int, ...] = ()) -> list[str | int] | None:
    """Where ``value`` holds a number JSON cannot (``1e999`` decodes to infinity), as a
    location list; None when it holds none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else list(path)
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = non_finite_at(item, (*path, key))
        if found is not None:
            return found
    return None


class ErrorBody(BaseModel):
    """Every error response: a short ``error`` and a ``detail`` (for 422: a list of
    ``{"loc", "msg", "type"}`` items naming the fields)."""

    error: str
    detail: Any = None


class CreatedBody(BaseModel):
    """201 answer of ``POST /v1/jobs``."""

    job_id: str
    sse_url: str
    ws_url: str


class RetryBody(BaseModel):
    max_attempts: int
    backoff_base: float
    factor: float
    cap: float
    jitter: float
    retry_timeouts: bool


class JobRecordBody(BaseModel):
    """A job's record (``JobRecord.to_dict()``); times are UTC ISO-8601."""

    job_id: str
    state: Literal["queued", "running", "retrying", "completed", "failed", "cancelled"]
    error: str | None
    payload: Any
    timeout_s: float | None
    priority: Literal["low", "normal", "high", "critical"]
    tags: dict[str, str]
    metadata: Any
    attempts: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    next_attempt_at: str | None
    retry: RetryBody | None


class JobListBody(BaseModel):
    jobs: list[JobRecordBody]
    next_cursor: str | None
    """Pass as ``cursor`` for the next page; null on the last page."""


class TransitionBody(BaseModel):
    state: Literal["queued", "running", "retrying", "completed", "failed", "cancelled"]
    at: str | None
    reason: str | None


class HistoryBody(BaseModel):
    history: list[TransitionBody]
