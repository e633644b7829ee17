"""How the keeper shows a job's stream: human lines, inline tokens, progress bars or JSON."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from trio_jobs import NarrationEvent, Signal, TerminalSignal

from ._units import human_bytes

__all__ = ["Printer"]


class Printer:
    """Shows a job's stream: human lines, inline tokens and progress bars, or JSON lines."""

    def __init__(self, *, json_lines: bool, out: TextIO | None = None) -> None:
        self.json_lines = json_lines
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._inline = False
        self._bar = False

    def _end_line(self) -> None:
        if self._inline or self._bar:
            self.out.write("\n")
            self._inline = self._bar = False

    def item(self, item: NarrationEvent | TerminalSignal) -> None:
        if self.json_lines:
            self.out.write(item.wire + "\n")
            self.out.flush()
            return
        if isinstance(item, TerminalSignal):
            self._end_line()
            self.out.write(item.wire + "\n")
        elif item.action == "token":
            if self._bar:
                self._end_line()
            self.out.write(str(item.fields.get("token", item.human)))
            self._inline = True
        elif isinstance(item.fields.get("progress"), dict):
            self._progress(item)
        else:
            self._end_line()
            self.out.write(f"[{item.actor}] {item.human}\n")
        self.out.flush()

    def _progress(self, item: NarrationEvent) -> None:
        progress: dict[str, Any] = item.fields["progress"]
        done, total = progress.get("done") or 0, progress.get("total")
        unit = progress.get("unit")
        if not self.tty:
            self._end_line()
            self.out.write(f"[{item.actor}] {item.human}\n")
            return
        if self._inline:
            self._end_line()
        width = 30
        if total:
            fraction = min(max(done / total, 0.0), 1.0)
            filled = int(width * fraction)
            bar = "#" * filled + "-" * (width - filled)
            amount = (
                f"{human_bytes(done)}/{human_bytes(total)}"
                if unit == "bytes"
                else f"{done}/{total}"
            )
            line = f"[{bar}] {fraction * 100:5.1f}% {amount}"
        else:
            line = f"[{'?' * width}] {human_bytes(done) if unit == 'bytes' else done}"
        rate = item.fields.get("rate_bytes_s")
        if isinstance(rate, int | float) and unit == "bytes":
            line += f" {human_bytes(rate)}/s"
        self.out.write("\r" + line + "\x1b[K")
        self._bar = True

    def note(self, text: str) -> None:
        """A line about the keeper itself (job id, interruption), on stderr."""
        if not self.json_lines:
            self._end_line()
            self.out.flush()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def error(self, message: str) -> None:
        """An ``[ERROR]`` the keeper decided itself (bad request, unreachable queen)."""
        self._end_line()
        self.out.write(TerminalSignal(Signal.ERROR, message).wire + "\n")
        self.out.flush()
