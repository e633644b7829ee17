"""Terminal signals: the one line that ends every job stream."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._models import JobState

__all__ = [
    "SIGNAL_OF_STATE",
    "STATE_OF_SIGNAL",
    "Signal",
    "TerminalSignal",
    "TIMEOUT_MESSAGE",
    "timeout_message",
]

TIMEOUT_MESSAGE = "Job timed out after {seconds}s"


def timeout_message(seconds: float) -> str:
    """The ``[ERROR]`` message of a job whose timeout fired."""
    return TIMEOUT_MESSAGE.format(seconds=f"{seconds:g}")


class Signal(enum.Enum):
    """Lifecycle signals and their wire forms (bare bracketed words, never JSON)."""

    START = "[START]"
    DONE = "[DONE]"
    ERROR = "[ERROR]"
    CANCELLED = "[CANCELLED]"

    @property
    def is_terminal(self) -> bool:
        return self is not Signal.START

    @staticmethod
    def parse(line: str) -> TerminalSignal | None:
        """Read a wire line as a signal, or return None when it is not one."""
        if not line.startswith("["):
            return None
        if line == "[DONE]":
            return TerminalSignal(Signal.DONE)
        if line == "[CANCELLED]":
            return TerminalSignal(Signal.CANCELLED)
        if line == "[START]":
            return TerminalSignal(Signal.START)
        if line == "[ERROR]" or line.startswith("[ERROR] "):
            return TerminalSignal(Signal.ERROR, line[8:])
        return None


@dataclass(frozen=True, slots=True)
class TerminalSignal:
    """A signal as it appears in a stream; ``id`` follows the job's last event id."""

    signal: Signal
    message: str | None = None
    id: int | None = None

    @property
    def wire(self) -> str:
        """The line as written on the wire: ``[DONE]``, ``[ERROR] <msg>``, ``[CANCELLED]``."""
        if self.signal is Signal.ERROR:
            return f"[ERROR] {self.message or ''}"
        value: str = self.signal.value
        return value

    def __str__(self) -> str:
        return self.wire


STATE_OF_SIGNAL: dict[Signal, JobState] = {
    Signal.DONE: JobState.COMPLETED,
    Signal.ERROR: JobState.FAILED,
    Signal.CANCELLED: JobState.CANCELLED,
}
"""The terminal state each terminal signal stands for."""

SIGNAL_OF_STATE: dict[JobState, Signal] = {state: sig for sig, state in STATE_OF_SIGNAL.items()}
"""The terminal signal of each terminal state."""
