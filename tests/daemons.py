"""Real daemon processes on 127.0.0.1 for the daemon, CLI and example tests.

:class:`Cluster` starts ``python -m servers <daemon> --port 0 ...`` children synchronously
(so one set can serve a whole test module) and always stops them: SIGTERM, then SIGKILL
after a grace period, in ``close()`` which the fixtures call in a ``finally``. A hive's
workers stop with it (and stop by themselves if their hive is killed). Each daemon gets its
own ``XDG_STATE_HOME`` under the cluster's directory, so a daemon left on its default
store (a SQLite file in its state directory) never writes into the user's home.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
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

    def start(
        self, name: str, argv: list[str], timeout_s: float = 30.0, *, state_of: str | None = None
    ) -> str:
        """Start ``python -m servers <argv>`` and return the URL of its first stdout line.

        ``state_of``: give it the state directory of the daemon started under that name
        (a successor restarted on a dead daemon's default store), not one of its own."""
        log = (self.logs / f"{name}.log").open("wb")
        state = self.logs / "state" / (state_of or name)
        env = {**os.environ, "XDG_STATE_HOME": str(state)}
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
    client: JobClient,
    model: str,
    *,
    token_delay_s: float | None = None,
    max_concurrent: int | None = None,
    hive: str = "localhost",
) -> dict[str, Any]:
    """``worker_spawn`` through the queen; returns the worker record (pid, url, ...)."""
    body: dict[str, Any] = {"operation": "worker_spawn", "model": model, "hive_id": hive}
    if token_delay_s is not None:
        body["token_delay_s"] = token_delay_s
    if max_concurrent is not None:
        body["max_concurrent"] = max_concurrent
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


# ---- a burst of submissions with open SSE streams, and what must hold after a crash ------

SseItem = tuple[int, str]
"""One SSE item as a client saw it: (id, data)."""


async def sse_items_into(response: httpx.Response, out: list[SseItem]) -> None:
    """Append ``(id, data)`` of every SSE item of the body to ``out`` as it arrives."""
    event_id: int | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            assert event_id is not None
            out.append((event_id, "\n".join(data)))
            data, event_id = [], None


async def read_sse(client: httpx.AsyncClient, url: str, after: int | None = None) -> list[SseItem]:
    """``(id, data)`` of every SSE item, in order, until the server ends the body."""
    headers = {"Last-Event-ID": str(after)} if after is not None else {}
    items: list[SseItem] = []
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 204:
            assert response.status_code == 200, response.status_code
            await sse_items_into(response, items)
    return items


async def _follow_sse(client: httpx.AsyncClient, url: str, seen: list[SseItem]) -> None:
    """Read a stream into ``seen`` until the server dies."""
    try:
        async with client.stream("GET", url) as response:
            await sse_items_into(response, seen)
    except httpx.HTTPError:
        pass


async def burst_until_killed(
    client: httpx.AsyncClient,
    rng: random.Random,
    body: Callable[[random.Random], dict[str, Any]],
    kill: Callable[[], object],
    *,
    submitters: int = 8,
    max_streams: int = 40,
    window_s: tuple[float, float] = (0.3, 1.2),
    after_acks: int | None = None,
) -> tuple[list[str], dict[str, list[SseItem]]]:
    """Submit ``body(rng)`` from ``submitters`` tasks, following about a third of the
    acknowledged jobs' streams (up to ``max_streams``), and call ``kill`` (a SIGKILL of
    the server) after a seeded random moment in ``window_s`` (or, with ``after_acks``,
    the moment that many ``201`` answers arrived: the last job has just been promised);
    return once every submitter and stream has seen the server die.

    Returns:
        The ids answered ``201``, in order, and the SSE items each followed job's stream
        delivered before the kill.
    """
    acked: list[str] = []
    seen: dict[str, list[SseItem]] = {}
    async with trio.open_nursery() as streams:

        async def submitter() -> None:
            while True:
                try:
                    response = await client.post("/v1/jobs", json=body(rng))
                except httpx.HTTPError:
                    return
                if response.status_code != 201:
                    continue
                job_id = response.json()["job_id"]
                acked.append(job_id)
                if len(acked) == after_acks:
                    kill()
                    return
                if rng.random() < 0.3 and len(seen) < max_streams:
                    seen[job_id] = []
                    url = f"/v1/jobs/{job_id}/stream"
                    streams.start_soon(_follow_sse, client, url, seen[job_id])

        async with trio.open_nursery() as burst:
            for _ in range(submitters):
                burst.start_soon(submitter)
            if after_acks is None:
                await trio.sleep(rng.uniform(*window_s))
                kill()
    return acked, seen


def _lost_range(data: str) -> tuple[int, int] | None:
    if not data.startswith("{"):
        return None
    event: dict[str, Any] = json.loads(data)
    if event.get("action") != "events_lost":
        return None
    return event["lost"]["first"], event["lost"]["last"]


async def check_stream_after_crash(
    client: httpx.AsyncClient, job_id: str, before: list[SseItem]
) -> None:
    """What a restarted server must tell a client that saw ``before`` of the job's
    stream: no id with other content; every id that vanished is inside an announced
    ``events_lost`` range; a signal seen is the stored end; a resume from a lost id
    gets the announcement first."""
    url = f"/v1/jobs/{job_id}/stream"
    after = await read_sse(client, url, after=0)
    now = dict(after)
    assert [i for i, _ in after] == sorted(now), "ids out of order"
    assert after and after[-1][1].startswith("["), "no terminal signal"
    lost = [r for r in (_lost_range(d) for _, d in after) if r is not None]
    for event_id, data in before:
        if event_id in now:
            assert now[event_id] == data, f"{job_id}: id {event_id} changed content"
        else:
            assert any(lo <= event_id <= hi for lo, hi in lost), (
                f"{job_id}: id {event_id} seen before the kill is gone unannounced"
            )
        if data.startswith("["):  # a signal seen is the job's stored end
            assert now.get(event_id) == data
    if before:
        last = before[-1][0]
        resumed = await read_sse(client, url, after=last)
        if last not in now:
            assert resumed, "a resume from a lost id got nothing"
            first = _lost_range(resumed[0][1])
            assert first is not None and first[0] <= last <= first[1], resumed[0]
        else:
            assert resumed == [(i, d) for i, d in after if i > last]
