"""How the keeper shows a job's stream: human lines, inline tokens, progress bars or JSON.

In JSON mode every stdout line is one JSON object: each event as on the wire, then the
terminal signal as ``{"signal": "DONE"}``, ``{"signal": "ERROR", "message": "..."}`` or
``{"signal": "CANCELLED"}`` (with ``message`` when the job gave one, and the ``job_id``
once known); an error the keeper decided itself is such an ``ERROR`` line too.

When the reader of stdout goes away (``| head -n 3`` has read its lines, ``| tee`` was
interrupted) a write raises :class:`OutputClosed`, and stdout is pointed at ``/dev/null``
so that nothing later (the interpreter's last flush included) writes to the broken pipe.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import sys
from typing import Any, TextIO

from trio_jobs import NarrationEvent, Signal, TerminalSignal
from trio_jobs._json import dumps

from ._units import human_bytes

__all__ = [
    "OutputClosed",
    "Printer",
    "output_is_pipe",
    "pipe_reader_gone",
    "signal_json",
    "silence",
]


class OutputClosed(Exception):
    """Stdout's reader went away (EPIPE): nobody sees the output any more."""


def signal_json(signal: TerminalSignal, job_id: str | None = None) -> str:
    """A terminal signal as the JSON line of ``--json`` mode (``{"signal": "DONE"}``)."""
    data: dict[str, Any] = {"signal": signal.signal.name}
    if signal.message:
        data["message"] = signal.message
    if job_id is not None:
        data["job_id"] = job_id
    return dumps(data)


def silence(out: TextIO) -> None:
    """Point ``out``'s file descriptor at /dev/null (its reader has gone), so that later
    writes and the interpreter's final flush go nowhere instead of failing with EPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def output_is_pipe(out: TextIO) -> bool:
    """True when ``out`` is a pipe (or FIFO), whose reader may go away."""
    try:
        return stat.S_ISFIFO(os.fstat(out.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def pipe_reader_gone(out: TextIO) -> bool:
    """True when ``out`` is a pipe whose read end is closed (poll reports ``POLLERR``), so
    the next write would fail with EPIPE; never blocks."""
    try:
        poller = select.poll()
        poller.register(out.fileno(), 0)  # POLLERR and POLLHUP are always reported
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


class Printer:
    """Shows a job's stream: human lines, inline tokens and progress bars, or JSON lines."""

    def __init__(self, *, json_lines: bool, out: TextIO | None = None) -> None:
        self.json_lines = json_lines
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.job_id: str | None = None
        self.closed = False
        self._inline = False
        self._bar = False

    def _write(self, text: str, *, flush: bool = True) -> None:
        """Write to stdout; :class:`OutputClosed` once its reader has gone."""
        if self.closed:
            raise OutputClosed
        try:
            self.out.write(text)
            if flush:
                self.out.flush()
        except OSError as exc:
            if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
                raise
            self.mark_closed()
            raise OutputClosed from None

    def mark_closed(self) -> None:
        """Stdout's reader has gone: write nothing more (see :func:`silence`)."""
        self.closed = True
        silence(self.out)

    def _end_line(self) -> None:
        if self._inline or self._bar:
            self._inline = self._bar = False
            self._write("\n", flush=False)

    def item(self, item: NarrationEvent | TerminalSignal) -> None:
        if self.json_lines:
            line = signal_json(item, self.job_id) if isinstance(item, TerminalSignal) else item.wire
            self._write(line + "\n")
            return
        if isinstance(item, TerminalSignal):
            self._end_line()
            self._write(item.wire + "\n", flush=False)
        elif item.action == "token":
            if self._bar:
                self._end_line()
            self._write(str(item.fields.get("token", item.human)), flush=False)
            self._inline = True
        elif isinstance(item.fields.get("progress"), dict):
            self._progress(item)
        else:
            self._end_line()
            self._write(f"[{item.actor}] {item.human}\n", flush=False)
        self._write("")

    def _progress(self, item: NarrationEvent) -> None:
        progress: dict[str, Any] = item.fields["progress"]
        done, total = progress.get("done") or 0, progress.get("total")
        unit = progress.get("unit")
        if not self.tty:
            self._end_line()
            self._write(f"[{item.actor}] {item.human}\n", flush=False)
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
        self._write("\r" + line + "\x1b[K", flush=False)
        self._bar = True

    def line(self, text: str) -> None:
        """One line of a command's own output (a record, a job id), on stdout."""
        self._write(text + "\n")

    def note(self, text: str) -> None:
        """A line about the keeper itself (job id, interruption), on stderr."""
        if self.json_lines:
            return
        if not self.closed:
            try:
                self._end_line()
                self._write("")
            except OutputClosed:
                pass
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def error(self, message: str) -> None:
        """An ``[ERROR]`` the keeper decided itself (bad request, unreachable queen)."""
        signal = TerminalSignal(Signal.ERROR, message)
        if self.json_lines:
            self._write(signal_json(signal, self.job_id) + "\n")
            return
        self._end_line()
        self._write(signal.wire + "\n")
