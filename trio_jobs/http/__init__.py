"""The job HTTP layer: one quart-trio blueprint for every trio-jobs server, and serve().

``create_app(registry, executor)`` gives an app with the SPEC §3 endpoints (SSE and
WebSocket streams, records, cancel, history, health, Prometheus metrics, OpenAPI);
``await nursery.start(serve, app)`` runs it on hypercorn's trio worker and returns its URL.

The names load on first use (PEP 562): importing :mod:`trio_jobs.http._options` for the job
options (as the ``trio-jobs`` keeper does) does not import quart or hypercorn.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from ._app import JobsBlueprint as JobsBlueprint
    from ._app import answer_response as answer_response
    from ._app import create_app as create_app
    from ._app import job_service as job_service
    from ._app import jobs_blueprint as jobs_blueprint
    from ._asgi import FastHandler as FastHandler
    from ._asgi import add_fast_route as add_fast_route
    from ._cross_site import SitePolicy as SitePolicy
    from ._errors import ApiError as ApiError
    from ._errors import error_response as error_response
    from ._errors import validation_detail as validation_detail
    from ._guard import on_request_end as on_request_end
    from ._handlers import Answer as Answer
    from ._handlers import read_body as read_body
    from ._openapi import openapi_document as openapi_document
    from ._options import ErrorBody as ErrorBody
    from ._options import JobOptions as JobOptions
    from ._options import RetryOptions as RetryOptions
    from ._serve import serve as serve
    from ._service import JobService as JobService
    from ._service import PayloadParser as PayloadParser
    from ._sse import SSE_HEADERS as SSE_HEADERS
    from ._wire import WireEncoder as WireEncoder

_LAZY: dict[str, str] = {
    "JobsBlueprint": "_app",
    "answer_response": "_app",
    "FastHandler": "_asgi",
    "add_fast_route": "_asgi",
    "Answer": "_handlers",
    "create_app": "_app",
    "job_service": "_app",
    "jobs_blueprint": "_app",
    "SitePolicy": "_cross_site",
    "ApiError": "_errors",
    "error_response": "_errors",
    "validation_detail": "_errors",
    "on_request_end": "_guard",
    "read_body": "_handlers",
    "openapi_document": "_openapi",
    "ErrorBody": "_options",
    "JobOptions": "_options",
    "RetryOptions": "_options",
    "serve": "_serve",
    "JobService": "_service",
    "PayloadParser": "_service",
    "SSE_HEADERS": "_sse",
    "WireEncoder": "_wire",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its private module the first time it is asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value: object = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Answer",
    "ApiError",
    "ErrorBody",
    "FastHandler",
    "JobOptions",
    "JobService",
    "JobsBlueprint",
    "PayloadParser",
    "RetryOptions",
    "SSE_HEADERS",
    "SitePolicy",
    "WireEncoder",
    "add_fast_route",
    "answer_response",
    "create_app",
    "error_response",
    "job_service",
    "jobs_blueprint",
    "openapi_document",
    "read_body",
    "serve",
    "validation_detail",
]
