"""The job HTTP layer: one quart-trio blueprint for every trio-jobs server, and serve().

``create_app(registry, executor)`` gives an app with the SPEC §3 endpoints (SSE and
WebSocket streams, records, cancel, history, health, Prometheus metrics, OpenAPI);
``await nursery.start(serve, app)`` runs it on hypercorn's trio worker and returns its URL.
"""

from ._app import JobsBlueprint as JobsBlueprint
from ._app import create_app as create_app
from ._app import job_service as job_service
from ._app import jobs_blueprint as jobs_blueprint
from ._cross_site import SitePolicy as SitePolicy
from ._errors import ApiError as ApiError
from ._errors import error_response as error_response
from ._errors import validation_detail as validation_detail
from ._guard import on_request_end as on_request_end
from ._openapi import openapi_document as openapi_document
from ._options import ErrorBody as ErrorBody
from ._options import JobOptions as JobOptions
from ._options import RetryOptions as RetryOptions
from ._serve import serve as serve
from ._service import JobService as JobService
from ._service import PayloadParser as PayloadParser
from ._sse import SSE_HEADERS as SSE_HEADERS
from ._wire import WireEncoder as WireEncoder

__all__ = [
    "ApiError",
    "ErrorBody",
    "JobOptions",
    "JobService",
    "JobsBlueprint",
    "PayloadParser",
    "RetryOptions",
    "SSE_HEADERS",
    "SitePolicy",
    "WireEncoder",
    "create_app",
    "error_response",
    "job_service",
    "jobs_blueprint",
    "on_request_end",
    "openapi_document",
    "serve",
    "validation_detail",
]
