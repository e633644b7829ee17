"""The operation contract shared by the keeper, the queen, the hives and the workers.

Every job body is one operation: a JSON object whose ``operation`` field (a snake_case tag)
picks the model that validates the rest. :func:`parse_operation` turns a body into an
:data:`Operation`; a bad body raises :class:`pydantic.ValidationError` whose errors name the
field (``loc``). Each operation knows whether the queen forwards it to a hive
(:meth:`OperationBase.should_forward_to_hive`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "MODEL_ID_PATTERN",
    "DEFAULT_HIVE",
    "Operation",
    "OperationBase",
    "OperationBody",
    "Status",
    "SshTest",
    "HiveInstall",
    "HiveUninstall",
    "HiveStart",
    "HiveStop",
    "HiveList",
    "HiveGet",
    "HiveStatus",
    "HiveRefreshCapabilities",
    "HiveImportSsh",
    "WorkerSpawn",
    "WorkerList",
    "WorkerGet",
    "WorkerDelete",
    "ModelDownload",
    "ModelList",
    "ModelGet",
    "ModelDelete",
    "Infer",
    "parse_operation",
    "operation_names",
    "operation_schema",
]

DEFAULT_HIVE = "localhost"
"""The hive alias used when an operation does not name one."""

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A model id is a plain file name in the hive's models directory (no path separators)."""

_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_PARTIAL_NAME = r"\.[Pp][Aa][Rr][Tt]$"
"""A download is written to ``<model>.part`` first, so no model may be named so."""
_HTTP_URL = r"^https?://"


def _operation_required(schema: dict[str, Any]) -> None:
    """A job body names its operation (the tag has a default only for Python callers)."""
    required = schema.setdefault("required", [])
    if "operation" not in required:
        required.insert(0, "operation")


def _openai_needs_upstream(schema: dict[str, Any]) -> None:
    """The ``openai`` backend needs ``upstream_url`` (checked by WorkerSpawn too)."""
    _operation_required(schema)
    schema["if"] = {"properties": {"backend": {"const": "openai"}}, "required": ["backend"]}
    schema["then"] = {
        "required": ["upstream_url"],
        "properties": {"upstream_url": {"type": "string"}},
    }


def _is_int(annotation: Any) -> bool:
    return annotation is int or int in get_args(annotation)


class OperationBase(BaseModel):
    """Fields and behaviour common to every operation.

    Validation is strict, as the JSON schema reads: no ``"5"`` for a number, no ``true``
    for an integer; an integral float (``2.0``) is an integer, as JSON Schema counts it.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, json_schema_extra=_operation_required
    )

    operation: str

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fixed = {
            name: int(value)
            for name, value in data.items()
            if type(value) is float
            and value.is_integer()
            and name in cls.model_fields
            and _is_int(cls.model_fields[name].annotation)
        }
        return {**data, **fixed} if fixed else data

    def should_forward_to_hive(self) -> bool:
        """True for operations the queen hands to a hive (worker and model management)."""
        return False

    @property
    def name(self) -> str:
        """The operation's tag, e.g. ``worker_spawn``."""
        return self.operation

    def to_body(self) -> dict[str, Any]:
        """The operation as a JSON-ready job body (unset optional fields left out); it
        remembers this operation (see :class:`OperationBody`)."""
        return OperationBody(self.model_dump(mode="json", exclude_none=True), self)


class OperationBody(dict[str, Any]):
    """A job body made by :meth:`OperationBase.to_body`: a plain JSON-ready dict that
    remembers the operation it was made from, so that parsing it again (the executor of
    the job whose payload it is) costs no validation. Setting or removing a key forgets
    the operation (it is then parsed as any dict); nested values must not be changed.
    Copies are plain dicts."""

    __slots__ = ("operation",)

    def __init__(self, data: dict[str, Any], operation: OperationBase) -> None:
        super().__init__(data)
        self.operation: OperationBase | None = operation

    def __reduce__(self) -> Any:  # copies and pickles are plain dicts
        return (dict, (dict(self),))

    def __setitem__(self, key: str, value: Any) -> None:
        self.operation = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.operation = None
        super().__delitem__(key)

    def __ior__(self, other: Any) -> OperationBody:  # type: ignore[override,misc]
        self.operation = None
        super().__ior__(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        self.operation = None
        super().update(*args, **kwargs)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.operation = None
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self.operation = None
        return super().pop(*args)

    def popitem(self) -> tuple[str, Any]:
        self.operation = None
        return super().popitem()

    def clear(self) -> None:
        self.operation = None
        super().clear()


class _HiveTargeted(OperationBase):
    """An operation carried out by one hive, named by its alias."""

    hive_id: str = Field(default=DEFAULT_HIVE, min_length=1)

    def should_forward_to_hive(self) -> bool:
        return True


def _check_model_id(value: str) -> str:
    if not _MODEL_ID.match(value):
        raise ValueError(
            "must be a plain file name: letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, at most 128 characters"
        )
    return value


# ---- queen-local operations ---------------------------------------------------------------


class Status(OperationBase):
    """The queen's view: hives (reachable or not), live workers, job counts."""

    operation: Literal["status"] = "status"


class SshTest(OperationBase):
    """Check that the hive's SSH host answers (``ssh <host> true``)."""

    operation: Literal["ssh_test"] = "ssh_test"
    alias: str = Field(min_length=1)


class HiveInstall(OperationBase):
    """Install trio-jobs on the hive's SSH host."""

    operation: Literal["hive_install"] = "hive_install"
    alias: str = Field(min_length=1)


class HiveUninstall(OperationBase):
    """Remove trio-jobs from the hive's SSH host."""

    operation: Literal["hive_uninstall"] = "hive_uninstall"
    alias: str = Field(min_length=1)


def _check_absolute(value: str | None) -> str | None:
    if value is not None and not value.startswith("/"):
        raise ValueError("must be an absolute path (the keeper resolves relative ones)")
    return value


class HiveStart(OperationBase):
    """Start the hive daemon (a local child of the queen, or over SSH).

    ``config``, ``state_dir`` and ``models_dir`` (absolute paths on the hive's host) are
    passed to ``trio-jobs hive``; a local hive gets the queen's own config file and state
    directory for those not given.
    """

    operation: Literal["hive_start"] = "hive_start"
    alias: str = Field(default=DEFAULT_HIVE, min_length=1)
    config: str | None = Field(default=None, min_length=1, json_schema_extra={"pattern": "^/"})
    state_dir: str | None = Field(default=None, min_length=1, json_schema_extra={"pattern": "^/"})
    models_dir: str | None = Field(default=None, min_length=1, json_schema_extra={"pattern": "^/"})

    _absolute = field_validator("config", "state_dir", "models_dir")(_check_absolute)


class HiveStop(OperationBase):
    """Stop a hive daemon the queen started."""

    operation: Literal["hive_stop"] = "hive_stop"
    alias: str = Field(default=DEFAULT_HIVE, min_length=1)


class HiveList(OperationBase):
    """The configured hives."""

    operation: Literal["hive_list"] = "hive_list"


class HiveGet(OperationBase):
    """One configured hive."""

    operation: Literal["hive_get"] = "hive_get"
    alias: str = Field(default=DEFAULT_HIVE, min_length=1)


class HiveStatus(OperationBase):
    """Whether one hive answers its health check."""

    operation: Literal["hive_status"] = "hive_status"
    alias: str = Field(default=DEFAULT_HIVE, min_length=1)


class HiveRefreshCapabilities(OperationBase):
    """Ask a hive for its health record again and show it."""

    operation: Literal["hive_refresh_capabilities"] = "hive_refresh_capabilities"
    alias: str = Field(default=DEFAULT_HIVE, min_length=1)


class HiveImportSsh(OperationBase):
    """Add every ``Host`` of an OpenSSH config file as a hive at ``http://HostName:port``."""

    operation: Literal["hive_import_ssh"] = "hive_import_ssh"
    ssh_config_path: str = Field(min_length=1)
    default_hive_port: int = Field(default=7834, ge=1, le=65535)


# ---- hive operations ----------------------------------------------------------------------


class WorkerSpawn(_HiveTargeted):
    """Start a worker process for ``model`` on the hive and wait until it answers health.

    ``queen_url`` is where the worker sends heartbeats; the queen fills it in when it
    forwards the operation. ``backend`` picks the worker's generator: ``tiny`` (built in,
    deterministic, no weights) or ``openai`` (an OpenAI-compatible streaming server at
    ``upstream_url``).
    """

    model_config = ConfigDict(json_schema_extra=_openai_needs_upstream)

    operation: Literal["worker_spawn"] = "worker_spawn"
    model: str = Field(min_length=1)
    worker: str = Field(default="cpu", min_length=1)
    device: int = Field(default=0, ge=0, le=4096)
    backend: Literal["tiny", "openai"] = "tiny"
    upstream_url: str | None = Field(default=None, json_schema_extra={"pattern": _HTTP_URL})
    token_delay_s: float | None = Field(default=None, ge=0, le=10)
    max_concurrent: int | None = Field(default=None, ge=1, le=4096)
    """Jobs the worker runs at once, its capacity as the queen schedules (default 4)."""
    queen_url: str | None = None

    @field_validator("upstream_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _upstream_for_openai(self) -> WorkerSpawn:
        if self.backend == "openai" and not self.upstream_url:
            raise ValueError("upstream_url is required when backend is 'openai'")
        return self


class WorkerList(_HiveTargeted):
    """The hive's workers with pid, port, model and state."""

    operation: Literal["worker_list"] = "worker_list"


class WorkerGet(_HiveTargeted):
    """One worker of the hive."""

    operation: Literal["worker_get"] = "worker_get"
    id: str = Field(min_length=1)


class WorkerDelete(_HiveTargeted):
    """Stop a worker: SIGTERM, then SIGKILL after the hive's grace period."""

    operation: Literal["worker_delete"] = "worker_delete"
    id: str = Field(min_length=1)


class ModelDownload(_HiveTargeted):
    """Download a model file over HTTP(S) into the hive's models directory.

    ``model`` is the file name it is stored under; ``url`` where to fetch it from (when
    omitted, the hive's ``--model-source`` base URL plus the name); ``sha256`` the expected
    hex digest, checked before the file appears under its name.
    """

    operation: Literal["model_download"] = "model_download"
    model: str = Field(
        json_schema_extra={"pattern": MODEL_ID_PATTERN, "not": {"pattern": _PARTIAL_NAME}}
    )
    url: str | None = Field(default=None, json_schema_extra={"pattern": _HTTP_URL})
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    _model_id = field_validator("model")(_check_model_id)

    @field_validator("model")
    @classmethod
    def _not_a_partial_name(cls, value: str) -> str:
        if re.search(_PARTIAL_NAME, value):
            raise ValueError("must not end in '.part': that is the name of a partial download")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class ModelList(_HiveTargeted):
    """The model files in the hive's models directory."""

    operation: Literal["model_list"] = "model_list"


class ModelGet(_HiveTargeted):
    """One model file: size and sha256."""

    operation: Literal["model_get"] = "model_get"
    id: str = Field(json_schema_extra={"pattern": MODEL_ID_PATTERN})

    _model_id = field_validator("id")(_check_model_id)


class ModelDelete(_HiveTargeted):
    """Remove one model file."""

    operation: Literal["model_delete"] = "model_delete"
    id: str = Field(json_schema_extra={"pattern": MODEL_ID_PATTERN})

    _model_id = field_validator("id")(_check_model_id)


# ---- inference ------------------------------------------------------------------------------


class Infer(OperationBase):
    """Generate text with a live worker serving ``model``; tokens arrive as narration.

    The queen schedules it on a worker (of hive ``hive_id`` when given) and streams the
    worker's job back; it is not forwarded through a hive.
    """

    operation: Literal["infer"] = "infer"
    model: str = Field(min_length=1)
    prompt: str
    max_tokens: int = Field(default=32, ge=1, le=100_000)
    temperature: float = Field(default=0.7, ge=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=1_000_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    hive_id: str | None = None
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1, max_length=10_000)
    """A chat (OpenAI ``messages``): an OpenAI-compatible upstream gets it as is; the
    tiny generator reads ``prompt``, which the queen renders from it."""
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, max_length=4)
    """Generation ends (finish reason ``stop``) before the first of these strings."""
    background: bool = False
    """Nobody waits on the job (an OpenAI background response): instead of failing after
    the queen's ``schedule_wait_s``, it waits for a worker slot as long as its job's
    timeout allows, and that timeout counts from the job's creation, not from each
    attempt (a job resumed after a queen restart keeps its end). The queen keeps it to
    itself: the worker's job does not carry it."""

    def to_body(self) -> dict[str, Any]:
        """As :meth:`OperationBase.to_body`; ``background`` only when true."""
        leave_out = None if self.background else {"background"}
        data = self.model_dump(mode="json", exclude_none=True, exclude=leave_out)
        return OperationBody(data, self)


Operation = Annotated[
    Status
    | SshTest
    | HiveInstall
    | HiveUninstall
    | HiveStart
    | HiveStop
    | HiveList
    | HiveGet
    | HiveStatus
    | HiveRefreshCapabilities
    | HiveImportSsh
    | WorkerSpawn
    | WorkerList
    | WorkerGet
    | WorkerDelete
    | ModelDownload
    | ModelList
    | ModelGet
    | ModelDelete
    | Infer,
    Field(discriminator="operation"),
]
"""Any operation, told apart by its ``operation`` tag."""

_ADAPTER: TypeAdapter[Operation] = TypeAdapter(Operation)


def parse_operation(body: Any) -> Operation:
    """Validate a job body (a dict, or an operation already parsed) into an operation.

    Raises:
        pydantic.ValidationError: the tag is missing or unknown, or a field is missing or
            invalid; each error's ``loc`` names the field.
    """
    if isinstance(body, OperationBase):
        return body  # type: ignore[return-value]
    if type(body) is OperationBody and body.operation is not None:
        return body.operation  # type: ignore[return-value]  # validated when it was made
    if isinstance(body, dict):
        tag = body.get("operation")
        if tag not in _NAMES:
            message = (
                "field 'operation' is required"
                if tag is None
                else f"unknown operation {tag!r}; expected one of: {', '.join(_NAMES)}"
            )
            error = PydanticCustomError("operation_unknown", message)
            raise ValidationError.from_exception_data(
                "Operation",
                [InitErrorDetails(type=error, loc=("operation",), input=tag)],
            )
    return _ADAPTER.validate_python(body)


def operation_schema() -> dict[str, Any]:
    """The JSON schema of a job body (any operation), for the OpenAPI document."""
    return _ADAPTER.json_schema()


def operation_names() -> list[str]:
    """Every operation tag, in contract order."""
    return list(_NAMES)


def _names() -> tuple[str, ...]:
    models: tuple[type[OperationBase], ...] = Operation.__origin__.__args__  # type: ignore[attr-defined]
    return tuple(str(model.model_fields["operation"].default) for model in models)


_NAMES = _names()


def wrong_operation(operation: str, expected: str) -> ValidationError:
    """The 422 a daemon gives for a valid operation it does not serve (the field is
    ``operation``; ``expected`` says what this daemon takes)."""
    return ValidationError.from_exception_data(
        "Operation",
        [
            {
                "type": "literal_error",
                "loc": ("operation",),
                "input": operation,
                "ctx": {"expected": expected},
            }
        ],
    )
