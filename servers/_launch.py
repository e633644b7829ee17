"""Starting daemons as real child processes (the demo and the tests use it).

:func:`running_daemon` starts ``python -m servers <argv>``, reads its ``listening on`` line
and hands out a :class:`Daemon`; whatever happens in the block, the process is stopped on
the way out (SIGTERM, then SIGKILL after a grace period), so nothing is left running.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import IO

import trio

from ._daemon import LISTENING_PREFIX
from ._proc import drain, read_first_line, terminate

__all__ = ["Daemon", "DaemonStartError", "running_daemon"]


class DaemonStartError(Exception):
    """The daemon exited or printed something else before its ``listening on`` line."""


@dataclass
class Daemon:
    """A daemon child process and the URL it listens on."""

    name: str
    process: trio.Process
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, wait up to ``grace_s`` (then SIGKILL); returns the exit code."""
        return await terminate(self.process, grace_s)

    def kill(self) -> None:
        """SIGKILL at once (a crash, for tests)."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)


@asynccontextmanager
async def running_daemon(
    argv: Sequence[str],
    *,
    startup_timeout_s: float = 30.0,
    stop_grace_s: float = 10.0,
    stderr: int | IO[bytes] | None = None,
) -> AsyncIterator[Daemon]:
    """Run ``python -m servers <argv>`` (e.g. ``["hive", "--port", "0"]``) for the block.

    Raises:
        DaemonStartError: it exited or printed something other than its address first.
        trio.TooSlowError: no address within ``startup_timeout_s``.
    """
    command = [sys.executable, "-m", "servers", *argv]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr
    )
    try:
        assert process.stdout is not None
        with trio.fail_after(startup_timeout_s):
            line = await read_first_line(process.stdout)
            if line is None or not line.startswith(LISTENING_PREFIX):
                code = await process.wait()
                raise DaemonStartError(
                    f"{' '.join(argv[:1])} exited with code {code} before listening"
                    if line is None
                    else f"{' '.join(argv[:1])} printed {line!r} instead of its address"
                )
        daemon = Daemon(argv[0] if argv else "daemon", process, line[len(LISTENING_PREFIX) :])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stdout)
            yield daemon
            nursery.cancel_scope.cancel()
    finally:
        await terminate(process, stop_grace_s)
