"""Real daemon processes on 127.0.0.1 for the daemon, CLI and example tests.

:class:`Cluster` starts ``python -m servers <daemon> --port 0 ...`` children synchronously
(so one set can serve a whole test module) and always stops them: SIGTERM, then SIGKILL
after a grace period, in ``close()`` which the fixtures call in a ``finally``. A hive's
workers stop with it (and stop by themselves if their hive is killed). Each daemon gets its
own ``XDG_STATE_HOME`` under the cluster's directory, so a daemon left on its default
store (a SQLite file in its state directory) never writes into the user's home.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
import trio

from trio_jobs import NarrationEvent, TerminalSignal
from trio_jobs._client import JobClient

LISTENING = "listening on "


class Cluster:
    """Daemon child processes; ``close()`` stops every one of them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        """The process of the daemon started as ``name``."""
        for started, proc, _ in self.procs:
            if started == name:
                return proc
        raise KeyError(name)

    def kill(self, name: str) -> int:
        """SIGKILL the daemon ``name`` (a crash) and wait for it; returns its exit code."""
        proc = self.proc(name)
        if proc.poll() is None:
            proc.kill()
        return proc.wait(10)

    def start(self, name: str, argv: list[str], timeout_s: float = 30.0) -> str:
        """Start ``python -m servers <argv>`` and return the URL of its first stdout line."""
        log = (self.logs / f"{name}.log").open("wb")
        env = {**os.environ, "XDG_STATE_HOME": str(self.logs / "state" / name)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "servers", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
        self.procs.append((name, proc, log))
        assert proc.stdout is not None
        line = _first_line(proc.stdout.fileno(), timeout_s)
        if not line.startswith(LISTENING):
            raise RuntimeError(f"{name} did not start: {line!r}\n{self.log(name)}")
        return line[len(LISTENING) :].strip()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def close(self, grace_s: float = 10.0) -> dict[str, int]:
        """Stop every daemon (latest first); returns their exit codes."""
        codes: dict[str, int] = {}
        for name, proc, log in reversed(self.procs):
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                try:
                    codes[name] = proc.wait(grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes[name] = proc.wait()
            finally:
                log.close()
                if proc.stdout is not None:
                    proc.stdout.close()
        self.procs.clear()
        return codes


def _first_line(fd: int, timeout_s: float) -> str:
    """The first line written to ``fd`` ('' on EOF or when ``timeout_s`` passes first)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def collect(
    client: JobClient, body: dict[str, Any], **options: Any
) -> tuple[str, list[NarrationEvent], TerminalSignal | None]:
    """Submit ``body`` and read its stream to the end: (job id, events, terminal signal)."""
    job_id = await client.submit(body, **options)
    events: list[NarrationEvent] = []
    terminal: TerminalSignal | None = None
    async with client.stream(job_id) as stream:
        async for item in stream:
            if isinstance(item, NarrationEvent):
                events.append(item)
            else:
                terminal = item
    return job_id, events, terminal


async def spawn_worker(
    client: JobClient, model: str, *, token_delay_s: float | None = None, hive: str = "localhost"
) -> dict[str, Any]:
    """``worker_spawn`` through the queen; returns the worker record (pid, url, ...)."""
    body: dict[str, Any] = {"operation": "worker_spawn", "model": model, "hive_id": hive}
    if token_delay_s is not None:
        body["token_delay_s"] = token_delay_s
    _, events, terminal = await collect(client, body, timeout_s=30)
    assert terminal is not None and terminal.wire == "[DONE]", terminal
    ready = [e for e in events if e.action == "worker_ready"]
    assert ready, [e.human for e in events]
    worker: dict[str, Any] = dict(ready[0].fields["worker"])
    return worker


async def running_jobs(url: str, token: str | None = None) -> list[dict[str, Any]]:
    """Jobs in state running (or retrying/queued) on the daemon at ``url``."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with httpx.AsyncClient(timeout=5, headers=headers) as http:
        active = []
        for state in ("queued", "running", "retrying"):
            response = await http.get(f"{url}/v1/jobs", params={"state": state})
            response.raise_for_status()
            active += response.json()["jobs"]
    return active


async def wait_idle(*urls: str, within_s: float = 5.0, token: str | None = None) -> None:
    """Wait until no daemon at ``urls`` has an active job (fails after ``within_s``)."""
    with trio.move_on_after(within_s):
        while True:
            busy = {url: await running_jobs(url, token) for url in urls}
            if not any(busy.values()):
                return
            await trio.sleep(0.05)
    raise AssertionError(
        f"jobs still active: { {u: [j['job_id'] for j in b] for u, b in busy.items()} }"
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def wait_pid_gone(pid: int, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still running")
        await trio.sleep(0.05)
