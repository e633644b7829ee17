"""narrate(): how code inside a job tells the world what it is doing."""

from __future__ import annotations

import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import trio

from ._channel import LogSender

__all__ = ["narrate", "current_job_id", "job_nursery", "JobContext"]

logger = logging.getLogger("trio_jobs.narration")


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a running job's tasks see through the context variable."""

    job_id: str
    sender: LogSender
    nursery: trio.Nursery
    token: trio.lowlevel.TrioToken
    thread: int


_CURRENT: ContextVar[JobContext | None] = ContextVar("trio_jobs_current_job", default=None)


def narrate(action: str, human: str, **fields: Any) -> None:
    """Say what the current job is doing.

    Callable from any code running inside a job (nested calls, child tasks started in the
    job's nursery); the job is found through a context variable. Never blocks and never
    checkpoints. Outside a job, or after the job's channel closed, the event goes to the
    ``trio_jobs.narration`` logger instead and nothing fails. ``actor=`` overrides the
    job's actor for this event; other keyword arguments become extra JSON fields.
    """
    ctx = _CURRENT.get()
    actor = fields.pop("actor", None)
    if ctx is not None:
        if threading.get_ident() != ctx.thread:
            # From a worker thread (trio.to_thread copies the context): hand the event to
            # the job's own trio thread, which alone may touch the channel.
            ts = time.time()
            try:
                ctx.token.run_sync_soon(_send_or_log, ctx, action, human, fields, ts, actor)
                return
            except trio.RunFinishedError:
                pass
        else:
            try:
                ctx.sender.send_nowait(action, human, fields, time.time(), actor)
                return
            except trio.ClosedResourceError:
                pass
    logger.info("%s: %s", action, human, extra={"narration": fields, "job_id": ctx and ctx.job_id})


def _send_or_log(
    ctx: JobContext, action: str, human: str, fields: dict[str, Any], ts: float, actor: Any
) -> None:
    try:
        ctx.sender.send_nowait(action, human, fields, ts, actor)
    except trio.ClosedResourceError:
        logger.info("%s: %s", action, human, extra={"narration": fields, "job_id": ctx.job_id})


def current_job_id() -> str | None:
    """The id of the job whose code is running, or None outside any job."""
    ctx = _CURRENT.get()
    return ctx.job_id if ctx is not None else None


def job_nursery() -> trio.Nursery:
    """The current job's nursery: tasks started here belong to the job.

    The job's terminal signal comes only after every such task has finished, and a cancel
    or timeout of the job cancels them. Raises RuntimeError outside a job.
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError("job_nursery() called outside a running job")
    return ctx.nursery
