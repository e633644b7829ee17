"""The worker daemon: ``infer`` as a job, tokens as narration, heartbeats to the queen."""

from ._backends import Backend as Backend
from ._backends import OpenAIBackend as OpenAIBackend
from ._backends import TinyBackend as TinyBackend
from ._backends import UpstreamError as UpstreamError
from ._server import WorkerConfig as WorkerConfig
from ._server import build_app as build_app
from ._server import make_backend as make_backend
from ._server import make_registry as make_registry
from ._server import serve_worker as serve_worker
from ._tiny import tiny_tokens as tiny_tokens

__all__ = [
    "Backend",
    "OpenAIBackend",
    "TinyBackend",
    "UpstreamError",
    "WorkerConfig",
    "build_app",
    "make_backend",
    "make_registry",
    "serve_worker",
    "tiny_tokens",
]
