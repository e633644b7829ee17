"""Two queen processes on one PostgreSQL schema (``--store postgres:DSN``, shared mode).

Real processes: a hive (the queens forward ``model_list`` to it, and its job list shows
how many jobs really ran) and two queens. A job submitted to one queen is read, streamed
and cancelled through the other; queued jobs run once across both; a queen killed
mid-job leaves its job to the other, which ends it ``FAILED("interrupted")``. Needs a
PostgreSQL server: see tests/pg.py (skips with instructions otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests import pg
from tests.daemons import Cluster, collect, wait_idle
from trio_jobs import JobClient, JobNotFound, NarrationEvent, PostgresStore, TerminalSignal

pytestmark = pytest.mark.postgres

CAP = 35.0
N = 12
WAITING = {"operation": "infer", "model": "nobody", "prompt": "p"}
"""No worker serves this model: the job runs (waiting for one) until it is stopped."""


@pytest.fixture
def dsn_schema() -> tuple[str, str]:
    """A server and a schema of its own (skips with instructions without a server)."""
    return pg.dsn_or_skip(), pg.fresh_schema()


async def _state(client: JobClient, job_id: str, want: str, within_s: float = 10.0) -> None:
    with trio.fail_after(within_s):
        while (await client.get(job_id))["state"] != want:
            await trio.sleep(0.02)


async def _visible(client: JobClient, job_id: str, within_s: float = 2.0) -> dict[str, Any]:
    """The job's record through a queen that may not have seen it written yet."""
    with trio.fail_after(within_s):
        while True:
            try:
                return await client.get(job_id)
            except JobNotFound:
                await trio.sleep(0.02)


async def _read(client: JobClient, job_id: str) -> tuple[list[NarrationEvent], str]:
    events: list[NarrationEvent] = []
    end = ""
    async with client.stream(job_id) as stream:
        async for item in stream:
            if isinstance(item, TerminalSignal):
                end = item.wire
            else:
                events.append(item)
    return events, end


async def test_two_queens_share_one_postgres_schema(
    tmp_path: Path, dsn_schema: tuple[str, str]
) -> None:
    dsn, schema = dsn_schema
    cluster = Cluster(tmp_path)
    try:
        hive = cluster.start(
            "hive", ["hive", "--port", "0", "--store", "memory", "--models-dir", str(tmp_path)]
        )
        common = [
            *("queen", "--port", "0", "--store", f"postgres:{dsn}", "--pg-schema", schema),
            *("--hive", f"localhost={hive}", "--schedule-wait", "60", "--lease", "1"),
        ]
        with trio.fail_after(CAP):
            a = cluster.start("a", [*common, "--node", "a"])
            async with JobClient(a) as ca:
                # Submitted before queen b exists, so queen a runs it.
                long_id = await ca.submit(WAITING, tags={"kind": "long"})
                await _state(ca, long_id, "running")
                b = cluster.start("b", [*common, "--node", "b"])
                async with JobClient(b) as cb, trio.open_nursery() as nursery:
                    # visible through b: record, history, stream
                    record = await cb.get(long_id)
                    assert record["state"] == "running" and record["tags"] == {"kind": "long"}
                    assert [h["state"] for h in await cb.history(long_id)] == [
                        "queued",
                        "running",
                    ]
                    with pytest.raises(JobNotFound):
                        await cb.get("job-nobody-made")
                    streamed: list[Any] = []

                    async def follow_on_b() -> None:
                        streamed.append(await _read(cb, long_id))

                    nursery.start_soon(follow_on_b)
                    # cancellable through b: queen a, which runs it, cancels it
                    assert (await cb.cancel(long_id))["job_id"] == long_id
                    await _state(ca, long_id, "cancelled")
                    await _state(cb, long_id, "cancelled")
                events, end = await _read(ca, long_id)
                assert end == "[CANCELLED]"
                assert streamed == [(events, "[CANCELLED]")]
                assert [e.action for e in events] == ["route_job", "infer_schedule"]

                # N queued jobs, submitted to both queens: each runs exactly once
                async with JobClient(b) as cb:
                    clients = [ca, cb]
                    ids = [
                        (clients[i % 2], await clients[i % 2].submit({"operation": "model_list"}))
                        for i in range(N)
                    ]
                    remote: list[str] = []
                    for client, job_id in ids:
                        events, end = await _read(client, job_id)
                        assert end == "[DONE]", (job_id, events)
                        forwards = [e for e in events if e.action == "forward"]
                        assert len(forwards) == 1, [e.action for e in events]
                        remote.append(str(forwards[0].fields["remote_job_id"]))
                        assert (await client.get(job_id))["attempts"] == 1
                    async with httpx.AsyncClient(timeout=5) as http:
                        hive_jobs = (await http.get(f"{hive}/v1/jobs")).json()["jobs"]
                    assert sorted(j["job_id"] for j in hive_jobs) == sorted(remote)
                    assert len(set(remote)) == N

                    # a queen killed mid-job: the other takes its job over
                    doomed = await cb.submit(WAITING)
                    await _state(cb, doomed, "running")
                    async with PostgresStore(dsn, schema=schema) as store:
                        stored = await store.load_job(doomed)
                    assert stored is not None and stored.owner in ("a", "b")
                    owner, survivor = ("a", cb) if stored.owner == "a" else ("b", ca)
                    # The owner writes RUNNING within a flush interval (20 ms) of its
                    # claim; until then the other queen reads QUEUED from the store.
                    await _state(survivor, doomed, "running", within_s=2.0)
                    # Its first events reach the store one flush after RUNNING may: the
                    # crash comes once they are there (what a client may have seen).
                    async with PostgresStore(dsn, schema=schema) as store:
                        with trio.fail_after(2.0):
                            while len(await store.load_events(doomed)) < 2:
                                await trio.sleep(0.02)
                    assert cluster.kill(owner) == -9
                    await _state(survivor, doomed, "failed")
                    record = await survivor.get(doomed)
                    assert record["error"] == "interrupted"
                    events, end = await _read(survivor, doomed)
                    assert end == "[ERROR] interrupted"
                    # the ids the dead owner had reserved are announced, never reused
                    assert [e.action for e in events] == [
                        "route_job",
                        "infer_schedule",
                        "events_lost",
                    ]
            await wait_idle(hive)
    finally:
        codes = cluster.close()
    assert codes["hive"] == 0
    assert sorted(codes[q] for q in ("a", "b")) == [-9, 0], codes


async def test_a_queen_restarted_under_its_node_name_lists_its_jobs(
    tmp_path: Path, dsn_schema: tuple[str, str]
) -> None:
    """Restart recovery in shared mode: a queen killed and started again with the same
    ``--node`` finds its finished jobs in the schema."""
    dsn, schema = dsn_schema
    cluster = Cluster(tmp_path)
    argv = ["queen", "--port", "0", "--store", f"postgres:{dsn}", "--pg-schema", schema]
    try:
        with trio.fail_after(CAP):
            first = cluster.start("first", [*argv, "--node", "first"])
            async with JobClient(first) as client:
                job_id, _, terminal = await collect(client, {"operation": "status"})
                assert terminal is not None and terminal.wire == "[DONE]"
            async with PostgresStore(dsn, schema=schema) as store:
                while (stored := await store.load_job(job_id)) is None or (
                    not stored.record.state.is_terminal
                ):
                    await trio.sleep(0.02)
            assert cluster.kill("first") == -9
            again = cluster.start("again", [*argv, "--node", "first"])
            async with JobClient(again) as client:
                assert [j["job_id"] for j in await client.list_jobs()] == [job_id]
                assert (await client.get(job_id))["state"] == "completed"
    finally:
        cluster.close()


async def test_a_queued_job_cancelled_through_the_other_queen(
    tmp_path: Path, dsn_schema: tuple[str, str]
) -> None:
    """Both queens busy (one slot each): a third job stays queued; cancelling it through
    the queen that did not create it must end it everywhere."""
    dsn, schema = dsn_schema
    cluster = Cluster(tmp_path)
    common = [
        *("queen", "--port", "0", "--store", f"postgres:{dsn}", "--pg-schema", schema),
        *("--schedule-wait", "60", "--max-concurrent", "1", "--lease", "1"),
    ]
    try:
        with trio.fail_after(CAP):
            a = cluster.start("a", [*common, "--node", "a"])
            b = cluster.start("b", [*common, "--node", "b"])
            async with JobClient(a) as ca, JobClient(b) as cb:
                busy = [await ca.submit(WAITING) for _ in range(2)]
                for job_id in busy:
                    await _state(ca, job_id, "running")
                queued = await ca.submit(WAITING)
                # b finds it once a has written it (within its flush interval)
                assert (await _visible(cb, queued))["state"] == "queued"
                await cb.cancel(queued)
                assert (await cb.get(queued))["state"] == "cancelled"
                await _state(ca, queued, "cancelled", within_s=2)
                for job_id in busy:
                    await ca.cancel(job_id)
                    await _state(ca, job_id, "cancelled")
    finally:
        cluster.close()
