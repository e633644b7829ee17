"""What "stored" promises, store by store: awkward text round-trips, a store that goes
away and comes back, a row the store refuses, a node that dies between claim and its
first write. Real SQLite files and a real PostgreSQL cluster (tests/pg.py)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from trio_jobs import (
    JobRegistry,
    JobState,
    MemoryStore,
    PostgresStore,
    RetryPolicy,
    StoreUnavailable,
    narrate,
    open_job_runner,
    open_registry,
    run_jobs,
    run_shared_jobs,
)
from trio_jobs._persist import INTERRUPTED, persister_of
from trio_jobs._stores import WriteBatch

from . import pg
from .helpers import collect
from .test_store import KINDS, StoreFactory, make_factory

CAP = 20.0

AWKWARD = [
    "nul \x00 inside",
    "\x00",
    "lone surrogate \ud800 and \udfff",
    "quotes \" ' \\ and \\u0000 spelt out",
    "control \x01\x07\x1b[31m\x7f",
    "emoji 🙂 and RTL \u202e and BOM \ufeff",
    "",
    "line\nbreaks\r\n",
]


@pytest.fixture(params=KINDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return make_factory(request.param, tmp_path)


async def test_awkward_text_round_trips_in_every_stored_field(stores: StoreFactory) -> None:
    """NUL, lone surrogates, escapes and control characters in payload, metadata, tags,
    narration (action, human, fields), the error and a cancel reason: read back exactly,
    and none of them blocks any other job's writes."""

    async def speak(job_id: str, payload: Any) -> None:
        for text in AWKWARD:
            narrate("say", text, text=text, nested={text: [text]})
        if payload.get("fail"):
            raise RuntimeError(payload["fail"])
        if payload.get("hang"):
            await trio.sleep_forever()

    with trio.fail_after(CAP):
        async with open_registry(stores(), interval=0.005) as reg:
            async with open_job_runner(reg, speak):
                ok = await reg.submit(
                    {"texts": AWKWARD}, tags={t: t for t in AWKWARD}, metadata=AWKWARD
                )
                failed = await reg.submit({"fail": AWKWARD[0] + AWKWARD[2]})
                hung = await reg.submit({"hang": True})
                for job_id in (ok, failed):
                    await reg.wait(job_id)
                while len(reg.events(hung)) < len(AWKWARD):
                    await trio.sleep(0.01)
                reg.cancel_job(hung, "reason " + AWKWARD[0] + AWKWARD[2])
                await reg.wait(hung)
                lines = {j: await collect(reg, j) for j in (ok, failed, hung)}
        persister = None
        async with open_registry(stores()) as again:
            persister = persister_of(again)
            rec = again.get(ok)
            assert rec.payload == {"texts": AWKWARD}
            assert rec.metadata == AWKWARD
            assert dict(rec.tags) == {t: t for t in AWKWARD}
            assert again.get(failed).error == AWKWARD[0] + AWKWARD[2]
            assert again.history(hung)[-1].reason == "reason " + AWKWARD[0] + AWKWARD[2]
            for job_id, before in lines.items():
                assert await collect(again, job_id) == before
            events = again.events(ok)
            assert [e.human for e in events] == AWKWARD
            assert [e.fields["nested"] for e in events] == [{t: [t]} for t in AWKWARD]
        assert persister is not None and persister.rejected_rows == 0


class FlakyStore(MemoryStore):
    """A memory store that can be taken down (every call fails as a lost connection
    would) and that refuses the rows of chosen jobs (as a store refuses a bad value)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.refuse: set[str] = set()

    def _check(self) -> None:
        super()._check()
        if self.down:
            raise ConnectionError("connection refused (the test took the store down)")

    async def write(self, batch: WriteBatch) -> None:
        self._check()
        bad = {w.record.id for w in batch.jobs} | {e.job_id for e in batch.events}
        if bad & self.refuse:
            await trio.lowlevel.checkpoint()
            raise ValueError(f"refused: {sorted(bad & self.refuse)}")
        await super().write(batch)

    async def ping(self) -> None:
        self._check()
        await trio.lowlevel.checkpoint()


async def test_an_unreachable_store_refuses_submissions_and_keeps_running_jobs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyStore()
    release = trio.Event()

    async def work(job_id: str, payload: Any) -> None:
        narrate("before", "before the outage")
        await release.wait()
        narrate("after", "during the outage")

    registry = JobRegistry(store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_jobs, registry, work)
        running = await registry.submit({})
        while len(registry.events(running)) < 1:
            await trio.sleep(0.01)
        store.down = True
        await trio.sleep(2)  # the idle probe sees it
        persister = persister_of(registry)
        assert persister is not None and not persister.health.ok
        assert "connection refused" in (persister.health.error or "")
        with pytest.raises(StoreUnavailable):
            await registry.submit({})
        release.set()
        await trio.sleep(1)
        # the job ran on; its end waits for the store: readers do not see it yet
        assert registry.get(running).state is JobState.COMPLETED
        assert not registry.job(running).log.settled  # type: ignore[union-attr]
        store.down = False
        assert (await registry.wait(running)).state is JobState.COMPLETED
        assert persister.health.ok
        stored = await store.load_job(running)
        assert stored is not None and stored.record.state is JobState.COMPLETED
        refused = [r for r in registry.list_jobs() if r.id != running]
        assert [r.error for r in refused] == ["not acknowledged: the store was unavailable"]
        assert (await registry.submit({})) in registry
        nursery.cancel_scope.cancel()


async def test_a_row_the_store_refuses_is_isolated_and_never_blocks_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = FlakyStore()

    async def work(job_id: str, payload: Any) -> None:
        narrate("tick", "a tick")

    registry = JobRegistry(store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_jobs, registry, work)
        persister = persister_of(registry)
        assert persister is not None
        poisoned = registry.create_job({"bad": True})
        store.refuse.add(poisoned)
        good = [await registry.submit({"i": i}) for i in range(5)]
        for job_id in good:
            assert (await registry.wait(job_id)).state is JobState.COMPLETED
            stored = await store.load_job(job_id)
            assert stored is not None and stored.record.state is JobState.COMPLETED
        assert await store.load_job(poisoned) is None
        assert persister.rejected_rows >= 1 and poisoned in persister.poisoned
        assert persister.health.ok  # one bad row is not an outage
        with pytest.raises(StoreUnavailable):
            await _refused(registry, store)
        store.refuse.clear()  # the value becomes writable: the job is written after all
        with trio.fail_after(5):
            while await store.load_job(poisoned) is None:
                await trio.sleep(0.05)
        assert not persister.poisoned
        nursery.cancel_scope.cancel()


async def _refused(registry: JobRegistry, store: FlakyStore) -> None:
    """A durable submission whose own row is refused is not acknowledged."""
    store.refuse.add("job-refused")
    try:
        await registry.submit({}, job_id="job-refused")
    finally:
        store.refuse.discard("job-refused")


@pytest.mark.postgres
async def test_a_node_dying_between_claim_and_first_write_never_runs_the_job_twice() -> None:
    """The claim starts the attempt in the store: a job the dead node claimed (and never
    wrote) is failed ``interrupted`` by the node that takes it over, not run again; a job
    with a retry left runs once more, and the history shows both runs."""
    dsn, schema = pg.dsn_or_skip(), pg.fresh_schema()
    ran: list[str] = []

    async def work(job_id: str, payload: Any) -> None:
        ran.append(job_id)

    with trio.fail_after(CAP):
        # the submitter: stores the jobs, runs none
        front = JobRegistry(store=PostgresStore(dsn, schema=schema, node="front"))
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_shared_jobs, front, work, claim=False))
            plain = await front.submit({})
            retried = await front.submit({}, retry=RetryPolicy(max_attempts=2, backoff_base=0))
            # a node claims both and dies before writing anything more
            async with PostgresStore(dsn, schema=schema, node="dead") as dead:
                claimed = await dead.claim(10, lease=0.3)
            assert {s.record.id for s in claimed} == {plain, retried}
            assert all(s.record.state is JobState.RUNNING for s in claimed)
            survivor = JobRegistry(store=PostgresStore(dsn, schema=schema, node="survivor"))
            async with trio.open_nursery() as inner:
                await inner.start(
                    partial(run_shared_jobs, survivor, work, poll_interval=0.01, lease=0.3)
                )
                done_plain = await front.wait(plain)
                done_retried = await front.wait(retried)
                inner.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    assert done_plain.state is JobState.FAILED and done_plain.error == INTERRUPTED
    assert done_retried.state is JobState.COMPLETED and done_retried.attempts == 2
    assert ran == [retried]  # the dead node's claim counted as the first run
    async with PostgresStore(dsn, schema=schema) as store:
        history = (await store.load_job(retried)).history  # type: ignore[union-attr]
    reasons = [t.reason or "" for t in history]
    assert any("on dead" in r for r in reasons) and any("on survivor" in r for r in reasons)
    assert json.dumps(reasons)  # plain text


async def test_numbers_no_json_can_hold_are_refused_and_retry_delays_bounded() -> None:
    """Through a real socket: ``1e999`` anywhere in a body is 422 naming where it is; a
    retry delay no date can hold is 422; nothing is created; reads keep working."""
    import httpx

    from trio_jobs.http import create_app, serve

    async def work(job_id: str, payload: Any) -> None:
        await trio.lowlevel.checkpoint()

    registry = JobRegistry()
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, create_app(registry, work))
            async with httpx.AsyncClient(base_url=url) as client:
                headers = {"content-type": "application/json"}
                bodies = {
                    '{"metadata": {"x": [1, 1e999]}}': ["metadata", "x", 1],
                    '{"n": -1e999}': ["n"],
                    '{"timeout_s": 1e999}': ["timeout_s"],
                    '{"retry": {"backoff_base": 1e12, "cap": 1e12}}': ["retry", "backoff_base"],
                }
                for body, where in bodies.items():
                    response = await client.post("/v1/jobs", content=body, headers=headers)
                    assert response.status_code == 422, (body, response.text)
                    detail = response.json()["detail"]
                    assert detail[0]["loc"] == where, (body, detail)
                assert (await client.get("/v1/jobs")).json()["jobs"] == []
                ok = await client.post(
                    "/v1/jobs", json={"retry": {"backoff_base": 2592000, "cap": 2592000}}
                )
                assert ok.status_code == 201
                assert (await client.get("/v1/jobs")).status_code == 200
            nursery.cancel_scope.cancel()
    with pytest.raises(ValueError, match="finite"):
        RetryPolicy(backoff_base=float("inf"))
    with pytest.raises(ValueError, match="at most"):
        RetryPolicy(cap=1e12)
    assert RetryPolicy(max_attempts=5000, factor=1000.0, cap=60).delay(4000) == 60


async def test_a_locked_sqlite_file_is_an_outage_the_writer_rides_out(tmp_path: Path) -> None:
    """Another process's exclusive lock on the SQLite file (``database is locked``): a
    submission is not acknowledged, a running job goes on, and everything is written once
    the lock is gone."""
    import sqlite3

    from trio_jobs import SQLiteStore

    path = tmp_path / "jobs.db"
    release = trio.Event()

    async def work(job_id: str, payload: Any) -> None:
        if payload.get("wait"):
            await release.wait()
        narrate("done", "finished")

    registry = JobRegistry(store=SQLiteStore(path))
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_jobs, registry, work)
            running = await registry.submit({"wait": True})
            while registry.running < 1:
                await trio.sleep(0.01)
            await trio.sleep(0.1)  # its RUNNING state is written
            other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            other.execute("BEGIN EXCLUSIVE")
            try:
                with pytest.raises(StoreUnavailable):
                    await registry.submit({})
                release.set()
                await trio.sleep(0.5)
                assert registry.get(running).state is JobState.COMPLETED
                job = registry.job(running)
                assert job is not None and not job.log.settled  # its end is not stored
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert (await registry.wait(running)).state is JobState.COMPLETED
            persister = persister_of(registry)
            assert persister is not None and persister.health.ok
            assert (await registry.wait(await registry.submit({}))).state is JobState.COMPLETED
            nursery.cancel_scope.cancel()
    async with SQLiteStore(path) as store:
        stored = await store.load_job(running)
    assert stored is not None and stored.record.state is JobState.COMPLETED
