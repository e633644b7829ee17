"""Restart recovery with real processes: a registry on a SQLite file is SIGKILLed mid-job
and a new one on the same file takes over.

The child process runs jobs, waits until its persistence has stored them (RUNNING, with
their events), prints the job ids and hangs; the test kills it with SIGKILL, so nothing
of the child's shutdown path runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from trio_jobs import JobRegistry, JobState, RetryPolicy, open_job_runner
from trio_jobs._persist import INTERRUPTED, open_registry
from trio_jobs._stores import SQLiteStore
from trio_jobs._stores._migrations import SQLITE as MIGRATIONS

from .helpers import child_until_killed, collect

CHILD = r"""
import json, sys, trio
from trio_jobs import JobRegistry, RetryPolicy, narrate, run_jobs
from trio_jobs._persist import persister_of
from trio_jobs._stores import SQLiteStore

async def executor(job_id, payload):
    for i in range(payload["n"]):
        narrate("step", f"step {i}", i=i)
    if payload.get("hang"):
        await trio.sleep_forever()

async def main():
    registry = JobRegistry(store=SQLiteStore(sys.argv[1]))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_jobs, registry, executor)
        ids = {
            "done": registry.create_job({"n": 2}, tags={"who": "child"}),
            "hung": registry.create_job({"n": 3, "hang": True}),
            "retry": registry.create_job(
                {"n": 1, "hang": True}, retry=RetryPolicy(max_attempts=2, backoff_base=0)
            ),
            "queued": registry.create_job({"n": 0}, priority="low", enqueue=False),
        }
        await registry.wait(ids["done"])
        while registry.running < 2 or persister_of(registry).pending:
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        print(json.dumps(ids), flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_sigkilled_daemon_restarts_with_every_job(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    with trio.fail_after(60):
        async with child_until_killed(CHILD, str(db)) as ids:
            pass

        ran: list[Any] = []

        async def executor(job_id: str, payload: Any) -> None:
            ran.append(job_id)

        registry = JobRegistry(store=SQLiteStore(db))
        async with open_job_runner(registry, executor, max_concurrent=1):
            listed = {r.id: r for r in registry.list_jobs()}
            assert set(listed) == set(ids.values())

            done = listed[ids["done"]]
            assert done.state is JobState.COMPLETED and done.tags == {"who": "child"}
            assert [json.loads(line)["id"] for line in (await collect(registry, done.id))[:-1]] == [
                1,
                2,
            ]

            hung = listed[ids["hung"]]
            assert hung.state is JobState.FAILED and hung.error == INTERRUPTED
            lines = await collect(registry, hung.id)
            events = [json.loads(line) for line in lines[:-1]]
            assert [e["human"] for e in events[:3]] == ["step 0", "step 1", "step 2"]
            # ids the child reserved past its last stored event may have been seen by
            # its readers: they are announced as lost, and the signal comes after them
            assert events[3]["action"] == "events_lost" and events[3]["lost"]["first"] == 4
            assert events[3]["id"] == events[3]["lost"]["last"] + 1 and len(events) == 4
            assert lines[-1] == "[ERROR] interrupted"
            assert [t.state for t in registry.history(hung.id)] == [
                JobState.QUEUED,
                JobState.RUNNING,
                JobState.FAILED,
            ]

            # attempts left: re-queued, and this time the executor returns
            retried = await registry.wait(ids["retry"])
            assert retried.state is JobState.COMPLETED and retried.attempts == 2
            assert retried.retry == RetryPolicy(max_attempts=2, backoff_base=0)
            # queued when the child died (its caller, gone with it, would have run it):
            # the new runner takes it, after the higher-priority re-queued job
            assert (await registry.wait(ids["queued"])).state is JobState.COMPLETED
            assert ran == [ids["retry"], ids["queued"]]

        # the recovery's outcomes were written back: a third start sees them as they are
        async with open_registry(SQLiteStore(db)) as third:
            assert third.get(ids["hung"]).error == INTERRUPTED
            assert third.get(ids["retry"]).state is JobState.COMPLETED
            assert await collect(third, ids["hung"]) == lines
        async with SQLiteStore(db) as store:
            assert await store.schema_version() == MIGRATIONS[-1][0]


def test_schema_migrations_table_records_the_version(tmp_path: Path) -> None:
    import sqlite3

    async def create() -> None:
        async with SQLiteStore(tmp_path / "v.db"):
            pass

    trio.run(create)
    trio.run(create)  # opening again applies nothing twice
    with sqlite3.connect(tmp_path / "v.db") as conn:
        rows = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert [r[0] for r in rows] == [v for v, _ in MIGRATIONS]
    assert all(r[1] > 0 for r in rows)
    assert mode == "wal"
