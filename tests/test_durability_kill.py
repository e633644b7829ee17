"""SIGKILL of a job server during a burst of submissions with streams open, then a restart
on the same SQLite file (real processes, real sockets, seeded rounds).

What must hold after every round: every job answered ``201`` is known to the restarted
server; no event id a client saw before the kill comes back with other content; a client
resuming from an id the kill lost is told so first (an ``events_lost`` event naming a
range that holds it); a terminal signal a client saw is the job's stored end.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

pytestmark = [
    pytest.mark.slow,
    # httpx leaves a request body's async generator unclosed when the server dies in the
    # middle of a POST; that is the client's, not what this test is about.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

CAP = 60.0

SERVER = r"""
import sys, trio
from trio_jobs import JobRegistry, SQLiteStore, narrate
from trio_jobs.http import create_app, serve

async def work(job_id, payload):
    for i in range(payload["n"]):
        narrate("tick", f"step {i} of {job_id}", i=i)
        await trio.sleep(0.003)

async def main():
    registry = JobRegistry(store=SQLiteStore(sys.argv[1]), actor="server")
    app = create_app(registry, work, max_concurrent=16)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, app)
        print(url, flush=True)

trio.run(main)
"""


async def _start(db: Path, nursery: trio.Nursery) -> tuple[trio.Process, str]:
    proc: trio.Process = await nursery.start(
        lambda task_status: trio.run_process(
            [sys.executable, "-c", SERVER, str(db)],
            stdout=subprocess.PIPE,
            check=False,
            task_status=task_status,
        )
    )
    assert proc.stdout is not None
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = await proc.stdout.receive_some()
        assert chunk, "the server exited before listening"
        buf += chunk
    return proc, buf.decode().strip()


async def _items_into(response: httpx.Response, out: list[tuple[int, str]]) -> None:
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


async def _read_stream(
    client: httpx.AsyncClient, url: str, after: int | None = None
) -> list[tuple[int, str]]:
    """``(id, data)`` of every SSE item, in order, until the server ends the body."""
    headers = {"Last-Event-ID": str(after)} if after is not None else {}
    items: list[tuple[int, str]] = []
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code != 204:
            assert response.status_code == 200, response.status_code
            await _items_into(response, items)
    return items


async def _follow(client: httpx.AsyncClient, url: str, seen: list[tuple[int, str]]) -> None:
    """Read a stream into ``seen`` until the server dies."""
    try:
        async with client.stream("GET", url) as response:
            await _items_into(response, seen)
    except httpx.HTTPError:
        pass


async def _round(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / f"jobs-{seed}.db"
    acked: list[str] = []
    seen: dict[str, list[tuple[int, str]]] = {}
    timeout = httpx.Timeout(5, read=None)
    async with trio.open_nursery() as nursery:
        proc, url = await _start(db, nursery)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

            async def submitter() -> None:
                while True:
                    try:
                        response = await client.post("/v1/jobs", json={"n": rng.randint(5, 60)})
                    except httpx.HTTPError:
                        return
                    if response.status_code != 201:
                        continue
                    job_id = response.json()["job_id"]
                    acked.append(job_id)
                    if rng.random() < 0.3 and len(seen) < 40:
                        seen[job_id] = []
                        nursery.start_soon(
                            _follow, client, f"/v1/jobs/{job_id}/stream", seen[job_id]
                        )

            async with trio.open_nursery() as burst:
                for _ in range(8):
                    burst.start_soon(submitter)
                await trio.sleep(rng.uniform(0.3, 1.2))
                proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert proc.returncode == -signal.SIGKILL
    assert acked, "no job was acknowledged before the kill"

    async with trio.open_nursery() as nursery:
        proc, url = await _start(db, nursery)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
                for job_id in acked:
                    response = await client.get(f"/v1/jobs/{job_id}")
                    assert response.status_code == 200, (job_id, response.text)
                for job_id, before in seen.items():
                    await _check_stream(client, job_id, before)
        finally:
            proc.send_signal(signal.SIGKILL)


def _lost_range(data: str) -> tuple[int, int] | None:
    if not data.startswith("{"):
        return None
    event: dict[str, Any] = json.loads(data)
    if event.get("action") != "events_lost":
        return None
    return event["lost"]["first"], event["lost"]["last"]


async def _check_stream(
    client: httpx.AsyncClient, job_id: str, before: list[tuple[int, str]]
) -> None:
    url = f"/v1/jobs/{job_id}/stream"
    after = await _read_stream(client, url, after=0)
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
        resumed = await _read_stream(client, url, after=last)
        if last not in now:
            assert resumed, "a resume from a lost id got nothing"
            first = _lost_range(resumed[0][1])
            assert first is not None and first[0] <= last <= first[1], resumed[0]
        else:
            assert resumed == [(i, d) for i, d in after if i > last]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sigkill_during_a_burst_loses_no_acknowledged_job_and_reuses_no_id(
    tmp_path: Path, seed: int
) -> None:
    with trio.fail_after(CAP):
        await _round(tmp_path, seed)
