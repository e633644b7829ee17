"""SIGKILL of a job server, and of a full queen with a worker, during a burst of
submissions with streams open, then a restart on the same SQLite file (real processes,
real sockets, seeded rounds).

What must hold after every round: every job answered ``201`` is known to the restarted
server; no event id a client saw before the kill comes back with other content; a client
resuming from an id the kill lost is told so first (an ``events_lost`` event naming a
range that holds it); a terminal signal a client saw is the job's stored end.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_jobs import JobClient

from .daemons import (
    Cluster,
    burst_until_killed,
    check_stream_after_crash,
    closed_port,
    collect,
)

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


async def _round(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / f"jobs-{seed}.db"
    timeout = httpx.Timeout(5, read=None)
    async with trio.open_nursery() as nursery:
        proc, url = await _start(db, nursery)
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            acked, seen = await burst_until_killed(
                client,
                rng,
                lambda rng: {"n": rng.randint(5, 60)},
                lambda: proc.send_signal(signal.SIGKILL),
            )
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
                    await check_stream_after_crash(client, job_id, before)
        finally:
            proc.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sigkill_during_a_burst_loses_no_acknowledged_job_and_reuses_no_id(
    tmp_path: Path, seed: int
) -> None:
    with trio.fail_after(CAP):
        await _round(tmp_path, seed)


def _queen(ghost: str, schedule_wait_s: float) -> list[str]:
    return [
        *("queen", "--port", "0", "--hive", f"localhost={ghost}"),
        *("--heartbeat-ttl", "30", "--schedule-wait", str(schedule_wait_s)),
    ]


def _queen_job(rng: random.Random) -> dict[str, Any]:
    """A ``status`` (two events) or an ``infer`` the queen forwards to its worker (one
    event per token, streamed from the worker into the queen's log)."""
    if rng.random() < 0.5:
        return {"operation": "status"}
    tokens = rng.randint(5, 30)
    return {"operation": "infer", "model": "slow", "prompt": "p", "max_tokens": tokens}


async def _worker_ready(queen: str) -> None:
    """Wait until the queen's ``status`` lists a live worker (it heartbeats)."""
    async with JobClient(queen) as client:
        while True:
            _, events, _ = await collect(client, {"operation": "status"})
            if any(e.fields.get("workers") for e in events if e.action == "status"):
                return
            await trio.sleep(0.05)


@pytest.mark.parametrize("seed", [4, 5])
async def test_sigkill_of_a_queen_loses_no_acknowledged_job_and_reuses_no_id(
    tmp_path: Path, seed: int
) -> None:
    """``python -m servers queen`` on its default store (``queen.db`` in its state
    directory) with a worker generating tokens, SIGKILLed during the burst; its successor
    on the same state directory knows every acknowledged job and keeps every id a client
    saw (or announces it lost). The kill comes right after a ``201``: that job must be
    committed already. The successor has no worker: jobs it re-queues fail fast."""
    rng = random.Random(seed)
    ghost = f"http://127.0.0.1:{closed_port()}"
    timeout = httpx.Timeout(5, read=None)
    cluster = Cluster(tmp_path)
    try:
        with trio.fail_after(1.5 * CAP):  # three daemons start
            queen = cluster.start("queen", _queen(ghost, 30))
            cluster.start(
                "worker",
                [
                    *("worker", "--port", "0", "--queen", queen, "--model", "slow"),
                    *("--token-delay", "0.01", "--heartbeat-s", "0.2"),
                ],
            )
            await _worker_ready(queen)
            async with httpx.AsyncClient(base_url=queen, timeout=timeout) as client:
                acked, seen = await burst_until_killed(
                    client,
                    rng,
                    _queen_job,
                    lambda: cluster.kill("queen"),
                    submitters=6,
                    after_acks=rng.randint(8, 24),
                )
            assert acked, "no job was acknowledged before the kill"
            assert (tmp_path / "state" / "queen" / "trio-jobs" / "queen.db").exists()

            successor = cluster.start("successor", _queen(ghost, 0.5), state_of="queen")
            async with httpx.AsyncClient(base_url=successor, timeout=timeout) as client:
                for job_id in acked:
                    response = await client.get(f"/v1/jobs/{job_id}")
                    assert response.status_code == 200, (job_id, response.text)
                for job_id, before in seen.items():
                    await check_stream_after_crash(client, job_id, before)
    finally:
        cluster.close()
