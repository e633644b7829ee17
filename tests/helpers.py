"""Small shared helpers for the core tests."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import trio

from trio_jobs import JobRegistry, JobStream, NarrationEvent, TerminalSignal


async def drain(stream: JobStream) -> list[str]:
    """Every wire line of a stream up to its end."""
    return [item.wire async for item in stream]


async def collect(registry: JobRegistry, job_id: str, after: int | None = None) -> list[str]:
    async with registry.subscribe(job_id, after=after) as stream:
        return await drain(stream)


def assert_one_signal_last(items: list[NarrationEvent | TerminalSignal]) -> TerminalSignal:
    signals = [i for i in items if isinstance(i, TerminalSignal)]
    assert len(signals) == 1, items
    assert items[-1] is signals[0]
    return signals[0]


@asynccontextmanager
async def child_until_killed(code: str, *args: str) -> AsyncIterator[dict[str, str]]:
    """Run ``python -c code *args``, a child that prints one JSON line (its job ids) once
    its jobs are stored; yield that line read back, and SIGKILL the child on exit (so
    nothing of its shutdown path runs)."""
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, "-c", code, *args],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        try:
            assert proc.stdout is not None
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await proc.stdout.receive_some()
                assert chunk, "the child exited before printing its job ids"
                buf += chunk
            ids: dict[str, str] = json.loads(buf)
            yield ids
        finally:
            proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL


@contextmanager
def serving_in_a_thread(app: Any) -> Iterator[str]:
    """Serve ``app`` (``trio_jobs.http.serve`` on 127.0.0.1, port 0) from its own
    ``trio.run`` in a thread, for sync clients (hypothesis, schemathesis); yield its URL.
    Leaving stops the server gracefully and joins the thread."""
    from trio_jobs.http import serve

    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, app)
            ready.put((url, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    url, token, scope = ready.get(timeout=10)
    try:
        yield url
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(10)
        assert not thread.is_alive()
