"""Several queens on one PostgreSQL store (``run_shared_jobs``).

Two nodes in this process (separate connections, so the database arbitrates their claims
for real), and a node in a child process that is SIGKILLed mid-job. Needs a PostgreSQL
server: see tests/pg.py (skips with instructions otherwise).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from trio_jobs import JobRegistry, JobState, narrate
from trio_jobs._persist import INTERRUPTED, SharedRunner, persister_of, run_shared_jobs
from trio_jobs._stores import PostgresStore

from . import pg
from .helpers import child_until_killed, collect

pytestmark = pytest.mark.postgres

CAP = 30.0


@pytest.fixture
def dsn_schema() -> tuple[str, str]:
    return pg.dsn_or_skip(), pg.fresh_schema()


Executor = Callable[[str, Any], Any]


@asynccontextmanager
async def node(
    dsn_schema: tuple[str, str],
    name: str,
    executor: Executor,
    **options: Any,
) -> AsyncIterator[tuple[JobRegistry, SharedRunner]]:
    """A queen: a registry on the shared store, running its share of the jobs."""
    dsn, schema = dsn_schema
    registry = JobRegistry(store=PostgresStore(dsn, schema=schema, node=name))
    options = {"poll_interval": 0.01, **options}
    async with trio.open_nursery() as nursery:
        shared: SharedRunner = await nursery.start(
            partial(run_shared_jobs, registry, executor, **options)
        )
        yield registry, shared
        nursery.cancel_scope.cancel()


async def test_each_job_runs_once_across_two_nodes(dsn_schema: tuple[str, str]) -> None:
    ran: list[tuple[str, str]] = []

    def executor_for(name: str) -> Executor:
        async def executor(job_id: str, payload: Any) -> None:
            ran.append((name, job_id))
            narrate("step", "one")
            await trio.sleep(0.001)
            narrate("step", "two")

        return executor

    with trio.fail_after(CAP):
        async with (
            node(dsn_schema, "a", executor_for("a"), max_concurrent=4) as (a, _),
            node(dsn_schema, "b", executor_for("b"), max_concurrent=4) as (b, _),
        ):
            ids = [(reg, reg.create_job({"i": i})) for i in range(40) for reg in (a, b)]
            for reg, job_id in ids:
                record = await reg.wait(job_id)
                assert record.state is JobState.COMPLETED, record
            lines = await collect(ids[0][0], ids[0][1])
            other = await collect(ids[1][0], ids[1][1])
    counts: dict[str, int] = {}
    for _, job_id in ran:
        counts[job_id] = counts.get(job_id, 0) + 1
    assert sorted(counts) == sorted(job_id for _, job_id in ids)
    assert set(counts.values()) == {1}
    for got in (lines, other):
        assert [json.loads(line)["human"] for line in got[:-1]] == ["one", "two"]
        assert got[-1] == "[DONE]"


async def test_job_submitted_to_one_node_is_seen_and_cancelled_through_it(
    dsn_schema: tuple[str, str],
) -> None:
    started = trio.Event()

    async def hang(job_id: str, payload: Any) -> None:
        narrate("start", "working on it")
        started.set()
        await trio.sleep_forever()

    with trio.fail_after(CAP):
        async with (
            node(dsn_schema, "front", hang, claim=False) as (front, front_shared),
            node(dsn_schema, "worker", hang) as (worker, worker_shared),
        ):
            job_id = front.create_job({"x": 1}, tags={"from": "front"})
            await started.wait()
            assert job_id in worker
            async with front.subscribe(job_id) as stream:
                first = await stream.receive()
                assert json.loads(first.wire)["human"] == "working on it"
                while front.get(job_id).state is not JobState.RUNNING:
                    await trio.sleep(0.01)
                assert front.cancel_job(job_id)
                rest = [item.wire async for item in stream]
            assert rest == ["[CANCELLED]"]
            assert (await worker.wait(job_id)).state is JobState.CANCELLED
            assert front.get(job_id).state is JobState.CANCELLED

            # and the other way: a job created on the worker, found and cancelled via front
            started = trio.Event()
            second = worker.create_job({"x": 2})
            await started.wait()
            assert second not in front
            assert (await front.fetch(second)).id == second  # visible in the store at once
            assert await worker_shared.follow(second)  # already known there: a no-op
            assert await front_shared.follow(second)
            assert not await front_shared.follow("job-missing")
            while front.get(second).state is not JobState.RUNNING:
                await trio.sleep(0.01)
            assert front.cancel_job(second)
            assert (await worker.wait(second)).state is JobState.CANCELLED
            assert (await front.wait(second)).state is JobState.CANCELLED


async def test_cancel_through_a_node_that_has_not_seen_the_claim(
    dsn_schema: tuple[str, str],
) -> None:
    """The front still sees its two jobs queued while the worker runs them: one already
    completed there, one hangs (the front hears no notices and polls rarely, as when its
    listener is down). Cancelling them through the front decides nothing there: the
    request goes to the worker, and the front's view ends as the store's does."""
    release = trio.Event()

    async def work(job_id: str, payload: Any) -> None:
        narrate("start", "taken")
        if payload["finish"]:
            await release.wait()
        else:
            await trio.sleep_forever()

    with trio.fail_after(CAP):
        async with node(dsn_schema, "front", work, claim=False, poll_interval=30, listen=False) as (
            front,
            shared,
        ):
            assert front.store is not None and persister_of(front) is not None
            polled = 0
            poll = front.store.poll  # type: ignore[attr-defined]

            async def counting_poll(after: dict[str, int]) -> Any:
                nonlocal polled
                result = await poll(after)
                polled += 1
                return result

            front.store.poll = counting_poll  # type: ignore[attr-defined]
            done = front.create_job({"finish": True})
            hung = front.create_job({"finish": False})
            await persister_of(front).flush()
            while not polled:  # the round the new jobs woke has followed them: unclaimed
                await trio.sleep(0.005)
            async with node(dsn_schema, "worker", work) as (worker, _):
                while not all(
                    j in worker and worker.get(j).state is JobState.RUNNING for j in (done, hung)
                ):
                    await trio.sleep(0.005)
                release.set()
                assert (await worker.wait(done)).state is JobState.COMPLETED
                assert persister_of(worker) is not None
                await persister_of(worker).flush()
                # the front polls every 30 s: it has not seen the worker claim them
                assert front.get(done).state is JobState.QUEUED
                assert front.get(hung).state is JobState.QUEUED
                front.cancel_job(done)
                front.cancel_job(hung)
                shared.poll_interval = 0.01
                assert front.get(done).state is JobState.QUEUED  # not decided here
                assert not front.cancel_job(done)  # asked already
                assert (await front.wait(done)).state is JobState.COMPLETED
                assert (await front.wait(hung)).state is JobState.CANCELLED
                assert (await worker.wait(hung)).state is JobState.CANCELLED
                done_lines = await collect(front, done)
                hung_lines = await collect(front, hung)
    assert [json.loads(line)["human"] for line in done_lines[:-1]] == ["taken"]
    assert done_lines[-1] == "[DONE]"
    assert hung_lines[-1] == "[CANCELLED]"
    dsn, schema = dsn_schema
    async with PostgresStore(dsn, schema=schema) as store:
        states = {j: (await store.load_job(j)) for j in (done, hung)}
    assert {j: s.record.state for j, s in states.items() if s} == {
        done: JobState.COMPLETED,
        hung: JobState.CANCELLED,
    }
    assert {s.owner for s in states.values() if s} == {"worker"}


async def test_cancel_of_an_unclaimed_job_is_decided_by_the_node_asked(
    dsn_schema: tuple[str, str],
) -> None:
    """No node runs jobs: a written, unclaimed job cancelled through its front is taken by
    the front, ends CANCELLED there and is written as such; one not written yet is simply
    cancelled (no other node can have it)."""

    async def never(job_id: str, payload: Any) -> None:
        raise AssertionError("no node claims jobs here")

    with trio.fail_after(CAP):
        async with node(dsn_schema, "front", never, claim=False) as (front, _):
            assert persister_of(front) is not None
            fresh = front.create_job({})
            assert front.cancel_job(fresh)
            assert front.get(fresh).state is JobState.CANCELLED
            written = front.create_job({})
            await persister_of(front).flush()
            assert front.cancel_job(written)
            assert (await front.wait(written)).state is JobState.CANCELLED
            await persister_of(front).flush()
            dsn, schema = dsn_schema
            async with PostgresStore(dsn, schema=schema) as store:
                rows = {j: await store.load_job(j) for j in (fresh, written)}
    assert all(r is not None and r.record.state is JobState.CANCELLED for r in rows.values())
    stored = rows[written]
    assert stored is not None and stored.owner == "front"


CHILD = r"""
import json, sys, trio
from trio_jobs import JobRegistry, RetryPolicy, narrate
from trio_jobs._persist import persister_of, run_shared_jobs
from trio_jobs._stores import PostgresStore

async def hang(job_id, payload):
    narrate("start", "child took it")
    await trio.sleep_forever()

async def main():
    registry = JobRegistry(store=PostgresStore(sys.argv[1], schema=sys.argv[2], node="child"))
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_shared_jobs(
                registry, hang, poll_interval=0.01, lease=0.5, task_status=task_status
            )
        )
        ids = {
            "plain": registry.create_job({}),
            "retry": registry.create_job({}, retry=RetryPolicy(max_attempts=2, backoff_base=0)),
        }
        while registry.running < int(sys.argv[3]) or persister_of(registry).pending:
            await trio.sleep(0.01)
        await trio.sleep(0.05)
        print(json.dumps(ids), flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_a_killed_nodes_jobs_are_taken_over(dsn_schema: tuple[str, str]) -> None:
    """The child node claims the front's job and two of its own, and is SIGKILLed; the
    front (following one of them) then starts claiming and takes all three over."""
    dsn, schema = dsn_schema
    ran: list[str] = []

    async def finish(job_id: str, payload: Any) -> None:
        ran.append(job_id)
        narrate("done", "survivor finished it")

    with trio.fail_after(CAP):
        async with node(dsn_schema, "front", finish, claim=False, lease=0.5) as (front, shared):
            mirrored = front.create_job({"from": "front"})
            async with child_until_killed(CHILD, dsn, schema, "3") as ids:
                while len(front.events(mirrored)) < 1:  # followed: running in the child
                    await trio.sleep(0.01)
                assert front.get(mirrored).state is JobState.RUNNING

            shared.claim = True  # the front becomes a worker: it takes over what died
            mirror = await front.wait(mirrored)
            while ids["plain"] not in front or ids["retry"] not in front:
                await trio.sleep(0.02)
            plain = await front.wait(ids["plain"])
            retried = await front.wait(ids["retry"])
            mirror_lines = await collect(front, mirrored)
            plain_lines = await collect(front, ids["plain"])
            retry_lines = await collect(front, ids["retry"])
    # The child may have handed out ids it reserved but did not store: the taker
    # announces them as lost and goes on after them, never reusing one.
    for lines in (mirror_lines, plain_lines, retry_lines):
        events = [json.loads(line) for line in lines[:-1]]
        assert events[0]["human"] == "child took it" and events[0]["id"] == 1
        assert events[1]["action"] == "events_lost"
        lost = events[1]["lost"]
        assert lost["first"] == 2 and events[1]["id"] == lost["last"] + 1
        assert [e["id"] for e in events] == sorted({e["id"] for e in events})
    assert mirror.state is JobState.FAILED and mirror.error == INTERRUPTED
    assert len(mirror_lines) == 3 and mirror_lines[-1] == "[ERROR] interrupted"
    assert front.running == 0
    assert plain.state is JobState.FAILED and plain.error == INTERRUPTED
    assert len(plain_lines) == 3 and plain_lines[-1] == "[ERROR] interrupted"
    assert retried.state is JobState.COMPLETED and retried.attempts == 2
    assert [json.loads(line)["human"] for line in retry_lines[2:-1]] == ["survivor finished it"]
    assert ran == [ids["retry"]]
    async with PostgresStore(dsn, schema=schema) as store:
        stored = await store.load_job(ids["plain"])
        stored_mirror = await store.load_job(mirrored)
    assert stored is not None and stored.record.state is JobState.FAILED
    assert stored.owner == "front"
    assert stored_mirror is not None and stored_mirror.record.state is JobState.FAILED
