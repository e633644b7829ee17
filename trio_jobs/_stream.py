"""execute_and_stream(): create a job, run it and read its wire lines, in one call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._channel import JobStream
from ._registry import JobRegistry
from ._runner import Executor, run_job

__all__ = ["WireLines", "execute_and_stream"]


class WireLines(trio.abc.ReceiveChannel[str]):
    """A job stream read as wire lines: JSON events, then the signal line."""

    def __init__(self, stream: JobStream) -> None:
        self._stream = stream

    @property
    def job_id(self) -> str:
        return self._stream.job_id

    def receive_nowait(self) -> str:
        return self._stream.receive_nowait().wire

    async def receive(self) -> str:
        return (await self._stream.receive()).wire

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def execute_and_stream(
    registry: JobRegistry,
    executor: Executor,
    payload: Any = None,
    *,
    timeout: float | None = None,
    **options: Any,
) -> AsyncIterator[WireLines]:
    """Create a job, run it with ``executor`` and hand out its wire lines.

    The channel yields each narration event as JSON, then exactly one terminal line
    (``[DONE]``, ``[ERROR] <msg>``, ``[CANCELLED]``) and then ends. The job runs in this
    block's own nursery, outside any runner's queue and concurrency limit. Leaving the
    block before the job ended cancels it and waits for it (its record says CANCELLED).
    Extra keyword options (priority, retry, tags, metadata) go to ``create_job``.
    """
    job_id = registry.create_job(payload, timeout=timeout, enqueue=False, **options)
    stream = registry.open_stream(job_id)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_job, registry, job_id, executor)
        try:
            yield WireLines(stream)
        finally:
            stream.close()
            registry.cancel_job(job_id, "stream left early")
