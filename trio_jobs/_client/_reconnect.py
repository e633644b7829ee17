"""How a dropped stream comes back: one policy and one resume cursor for SSE and WebSocket.

A stream that drops before its terminal signal reconnects with ``Last-Event-ID`` set to the
last event it delivered, after ``backoff_s * 2**(n-1)`` seconds before attempt ``n`` (capped
by the server's ``retry:`` when it sent one, else by 30 s), up to ``max_reconnects``
attempts in a row without a new line in between; what the server sends again on the new
connection (ids up to the one resumed after) is dropped, so a stream has no gap and no
duplicate. The waits are ``trio.sleep``: a cancel ends them, and nothing is retried then.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .._exceptions import StreamEndedWithoutSignal
from ._lines import sse_int

__all__ = ["ReconnectPolicy", "Resumable", "ResumeCursor"]

_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How patiently a stream reconnects: the client's ``max_reconnects`` and ``backoff_s``."""

    max_reconnects: int = 5
    backoff_s: float = 0.2

    def delay(self, failures: int, retry_ms: int | None = None) -> float:
        """The wait before reconnect attempt ``failures`` (capped by the server's ``retry:``)."""
        cap = _MAX_BACKOFF_S if retry_ms is None else retry_ms / 1000
        return float(min(self.backoff_s * 2 ** (failures - 1), cap))


class ResumeCursor:
    """Where one stream stands: the last event delivered, and its failures in a row.

    ``last_event_id`` is what a reconnect sends as ``Last-Event-ID``; ``reconnects`` counts
    the attempts made. Each connection calls :meth:`connected` once open; its lines are then
    checked with :meth:`replayed` and passed on with :meth:`delivered`.
    """

    __slots__ = (
        "_cause",
        "_failures",
        "_resumed_after",
        "last_event_id",
        "last_num",
        "policy",
        "reconnects",
    )

    def __init__(self, policy: ReconnectPolicy, last_event_id: str | int | None = None) -> None:
        self.policy = policy
        self.last_event_id: str | None = None if last_event_id is None else str(last_event_id)
        self.last_num = sse_int(self.last_event_id)
        self.reconnects = 0
        self._resumed_after: int | None = None
        self._failures = 0
        self._cause: BaseException | None = None

    def connected(self) -> None:
        """A connection is open: the ids up to the last one delivered are replays on it."""
        self._resumed_after = self.last_num

    def replayed(self, num: int | None) -> bool:
        """Whether the event numbered ``num`` was delivered before this connection."""
        return num is not None and self._resumed_after is not None and num <= self._resumed_after

    def delivered(self, event_id: str | None, num: int | None) -> None:
        """A new line was passed on: failures start over; an id is where a reconnect resumes."""
        if event_id is not None:
            self.last_event_id, self.last_num = event_id, num
        self._failures = 0

    def failed(self, cause: BaseException) -> None:
        """The connection broke (or could not be made) before the terminal signal."""
        self._failures += 1
        self._cause = cause

    def given_up(self, what: str) -> StreamEndedWithoutSignal | None:
        """The error to end the stream with once the attempts are spent, else None."""
        if self._failures <= self.policy.max_reconnects:
            return None
        cause = self._cause
        error = StreamEndedWithoutSignal(
            f"{what} ended before its terminal signal and was not resumed after "
            f"{self.policy.max_reconnects} reconnect attempt(s) (last event id "
            f"{self.last_event_id}): {cause!r}"
        )
        error.__cause__ = cause
        return error

    async def wait(self, retry_ms: int | None = None) -> None:
        """Sleep the backoff before the next attempt, then count it (a cancel ends the wait)."""
        await trio.sleep(self.policy.delay(self._failures, retry_ms))
        self.reconnects += 1


class Resumable:
    """What a resumable stream tells about its cursor: ``last_event_id``, ``reconnects``."""

    _cursor: ResumeCursor

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event received: where a reconnect resumes."""
        return self._cursor.last_event_id

    @property
    def reconnects(self) -> int:
        """Reconnect attempts made so far."""
        return self._cursor.reconnects
