"""What a job's stream hands out, and batch receiving: shared by server and client streams.

A bottom-floor module (it imports only values): the in-process :class:`~trio_jobs.JobStream`
and the client's SSE and WebSocket streams both build on it, so the client needs no
server-side module and the batch fast path (``await wait_ready()``, then
``receive_batch()``) means the same on every stream.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Generic, TypeVar

import trio

from ._models import NarrationEvent
from ._signals import TerminalSignal

__all__ = ["BatchReceiveMixin", "StreamItem"]

StreamItem = NarrationEvent | TerminalSignal
_T = TypeVar("_T")


class BatchReceiveMixin(Generic[_T]):
    """``receive_batch()`` on top of ``receive_nowait()``, for the job's stream channels."""

    __slots__ = ()

    @abstractmethod
    def receive_nowait(self) -> _T:
        """An item that is ready; ``trio.WouldBlock`` if none, ``trio.EndOfChannel`` at the end."""

    def receive_batch(self, limit: int = 1024) -> list[_T]:
        """Everything ready now (up to ``limit`` items), without blocking; may be empty.

        An empty batch right after ``wait_ready()`` returned means the stream has ended.
        """
        items: list[_T] = []
        try:
            while len(items) < limit:
                items.append(self.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            pass
        return items
