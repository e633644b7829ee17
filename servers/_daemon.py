"""What every daemon shares: serving its app, the ``listening on`` line, stopping on signals."""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

__all__ = ["is_loopback", "run_daemon", "setup_logging", "LISTENING_PREFIX"]

logger = logging.getLogger("servers")

LISTENING_PREFIX = "listening on "
"""The first stdout line of a daemon is this prefix followed by its base URL."""

StopHook = Callable[[], Awaitable[None]]
Background = Callable[[str], Awaitable[None]]


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (stdout carries only the ``listening on`` line).

    INFO is for what an operator acts on (daemons starting and stopping, workers joining,
    going not ready or lost, jobs failed over or ended by a stop); heartbeats and
    per-request chatter are DEBUG. httpx logs every request at INFO (a heartbeat per worker
    per second): its loggers stay at WARNING, or INFO with ``verbose``.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_daemon(
    app: Any,
    *,
    host: str,
    port: int,
    name: str,
    background: list[Background] | None = None,
    on_stop: StopHook | None = None,
    stop_grace_s: float = 5.0,
    started: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then stop gracefully.

    Once the socket is bound, prints ``listening on http://HOST:PORT`` as the first stdout
    line (flushed) and starts each ``background(url)`` task. On a signal, ``on_stop`` runs
    (bounded by ``stop_grace_s``, shielded) and then the server and background tasks are
    cancelled; the function returns when everything has ended.
    """
    from trio_jobs.http import serve  # the HTTP stack is loaded only by daemons

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(serve, app, host=host, port=port))
            sys.stdout.write(f"{LISTENING_PREFIX}{url}\n")
            sys.stdout.flush()
            logger.info("%s %s (pid %d)", name, url, os.getpid())
            if started is not None:
                started(url)
            # What start-up loaded (modules, the app, schemas) lives as long as the
            # daemon: kept out of the collector's full passes, which otherwise scan it
            # all and pause the event loop for tens of ms (the p99 of a cancel).
            gc.freeze()
            for task in background or ():
                nursery.start_soon(task, url)
            task_status.started(url)
            async for signum in signals:
                logger.info("%s: %s received, stopping", name, signal.Signals(signum).name)
                break
            if on_stop is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(stop_grace_s):
                    await on_stop()
            nursery.cancel_scope.cancel()
    logger.info("%s stopped", name)
