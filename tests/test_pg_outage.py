"""A PostgreSQL server stopped for 10 s under two nodes sharing its table, then started
again (a real cluster of this test's own, stopped with ``pg_ctl``).

What must hold: both nodes reconnect; ``/health`` of a node served over a real socket
answers 503 naming the store during the outage and 200 after; a submission during the
outage gets 503 and creates nothing; every acknowledged job ends; none that ran to its end
is recorded ``interrupted``; each job without retries ran at most once.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from trio_jobs import JobRegistry, JobState, PostgresStore, narrate, run_shared_jobs
from trio_jobs.http import create_app, serve

from . import pg

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

OUTAGE_S = 10.0


@pytest.fixture
def cluster() -> Any:
    bin_dir = pg.find_bin_dir()
    if bin_dir is None:
        pg.dsn_or_skip()  # skips (or fails in CI) saying how to get a server
    assert bin_dir is not None
    own = pg.Cluster(bin_dir)
    try:
        yield own, own.start()
    finally:
        own.stop()


async def test_two_nodes_ride_out_a_postgres_restart(cluster: Any) -> None:
    own, dsn = cluster
    runs: Counter[str] = Counter()

    async def work(job_id: str, payload: Any) -> None:
        runs[job_id] += 1
        narrate("begin", "working")
        await trio.sleep(payload["s"])
        narrate("end", "worked")

    nodes = [JobRegistry(store=PostgresStore(dsn, schema="outage", node=name)) for name in "ab"]
    with trio.fail_after(OUTAGE_S + 60):
        async with trio.open_nursery() as nursery:
            # Unequal leases give the nodes unequal reconnect backoffs (a third of the
            # lease at most), so one is back before the other, as with separate processes.
            for registry, lease in zip(nodes, (4.0, 2.0), strict=True):
                await nursery.start(
                    partial(
                        run_shared_jobs,
                        registry,
                        work,
                        max_concurrent=8,
                        poll_interval=0.02,
                        lease=lease,
                    )
                )
            url = await nursery.start(serve, create_app(nodes[0], None))
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                assert (await client.get("/health")).status_code == 200
                # the first 16 run through the outage and past it; the rest wait for it
                acked = [
                    await nodes[i % 2].submit({"s": OUTAGE_S + 2.0 if i < 16 else 0.2})
                    for i in range(30)
                ]
                while sum(r.running for r in nodes) < 16:
                    await trio.sleep(0.02)

                await trio.to_thread.run_sync(own.down)
                stopped = trio.current_time()
                with trio.fail_after(5):
                    while (health := await client.get("/health")).status_code == 200:
                        await trio.sleep(0.1)
                assert health.status_code == 503
                body = health.json()
                assert body["status"] == "store unavailable" and not body["store"]["ok"]
                assert body["store"]["error"]
                refused = await client.post("/v1/jobs", json={"s": 0})
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"] == "store unavailable"
                await trio.sleep(max(0.0, stopped + OUTAGE_S - trio.current_time()))
                await trio.to_thread.run_sync(own.up)

                records = [await nodes[i % 2].wait(job_id) for i, job_id in enumerate(acked)]
                with trio.fail_after(10):
                    while (await client.get("/health")).status_code != 200:
                        await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    assert all(r.state is JobState.COMPLETED for r in records), [
        (r.state.value, r.error) for r in records if r.state is not JobState.COMPLETED
    ]
    assert max(runs.values()) == 1 and set(runs) == set(acked)
    async with PostgresStore(dsn, schema="outage") as store:
        stored = [await store.load_job(job_id) for job_id in acked]
        every = await store.load_jobs()
    assert all(s is not None and s.record.state is JobState.COMPLETED for s in stored)
    # the refused submission left nothing behind but its own honest record, if any
    assert {s.record.id for s in every} - set(acked) <= {
        s.record.id
        for s in every
        if s.record.state is JobState.FAILED and (s.record.error or "").startswith("not ack")
    }
