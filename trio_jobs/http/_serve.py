"""serve(): run an app on hypercorn's trio worker, with a graceful stop on cancellation.

The worker is hypercorn's, with a leaner connection class (``_connection``)."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.utils import wrap_app

from ._app import job_service
from ._connection import worker_serve
from ._service import is_loopback

__all__ = ["serve"]

#: hypercorn cuts connections still open this long after the streams' drain deadline; our
#: streams end themselves before, so this only catches handlers that do not.
CUT_MARGIN_S = 0.5
#: Absolute bound on the whole stop (drain + cut + lifespan shutdown) past ``grace_s``.
HARD_LIMIT_S = 5.0


async def serve(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    grace_s: float = 3.0,
    backlog: int = 2048,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until the surrounding scope is cancelled.

    Use it as ``base_url = await nursery.start(serve, app)``: ``task_status.started`` gets
    the bound address (``http://127.0.0.1:PORT``; ``port=0`` picks a free port) once the
    socket listens.

    Cancelling the caller stops the server gracefully; the cancellation does not cut the
    cleanup short (the server runs in a shielded scope with its own hard deadline). What
    clients see:

    * the listening socket closes at once (new connections are refused); idle keep-alive
      connections are closed;
    * requests in flight finish; ``/health`` says ``"draining"``;
    * every open job stream keeps following its job for up to ``grace_s`` seconds: a
      stream whose job ends in that time gets its terminal signal (``[DONE]`` ...) and a
      normal end; the others get the events already ready, then the comment
      ``: server shutting down`` and a clean end of the body (never a cut chunk). An SSE
      client sees a body that ended without a signal and may reconnect with
      ``Last-Event-ID`` to another instance. WebSockets close with 1001;
    * then the app's ``after_serving`` runs: the job runner is cancelled, so jobs still
      running end ``[CANCELLED]`` in the registry; queued jobs stay queued.

    Anything still open ``grace_s + 0.5`` s after the stop began is cut by hypercorn; the
    whole stop is bounded by ``grace_s + 5`` s.

    Raises:
        ValueError: ``host`` is not a loopback address and the app's job API has no token
            while it requires one off loopback.
        OSError: the address cannot be bound.
    """
    service = job_service(app)
    if (
        service is not None
        and service.require_token_off_loopback
        and service.token is None
        and not is_loopback(host)
    ):
        raise ValueError(
            f"refusing to serve on non-loopback address {host!r} without a token: "
            "pass token=... to create_app (or require_token_off_loopback=False)"
        )
    if grace_s < 0:
        raise ValueError("grace_s must be >= 0")
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace_s + CUT_MARGIN_S
    config.backlog = backlog
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")

    stop = trio.Event()

    async def shutdown_trigger() -> None:
        await stop.wait()

    server_scope = trio.CancelScope(shield=True)

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            await worker_serve(
                wrap_app(app, config.wsgi_max_body_size, None),
                config,
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(run)
        task_status.started(binds[0])
        try:
            await trio.sleep_forever()
        finally:
            if service is not None:
                service.begin_drain(grace_s)
            stop.set()
            server_scope.deadline = trio.current_time() + grace_s + HARD_LIMIT_S
