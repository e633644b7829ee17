"""Job stores and persistence: the same scenarios on the memory, SQLite and PostgreSQL
stores (``TRIO_JOBS_TEST_STORE=memory|sqlite|postgres`` picks one; default all).

Each test runs a registry persisted to a store, "restarts" by opening a new registry on
the same data, and checks what came back. Stores do real I/O in threads, so these tests
use the real clock with short waits under a ``fail_after`` cap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_jobs import (
    JobNotFound,
    JobRegistry,
    JobState,
    Priority,
    RetryPolicy,
    Transition,
    narrate,
    open_job_runner,
)
from trio_jobs._models import JobRecord, NarrationEvent
from trio_jobs._persist import INTERRUPTED, open_registry, persister_of, run_persistence
from trio_jobs._stores import (
    JobStore,
    JobWrite,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    WriteBatch,
    check_json,
)
from trio_jobs._stores._migrations import POSTGRES as PG_MIGRATIONS
from trio_jobs._stores._migrations import SQLITE as MIGRATIONS

from . import pg
from .helpers import collect

StoreFactory = Callable[[], JobStore]

_KINDS = ["memory", "sqlite", "postgres"]
_ONLY = os.environ.get("TRIO_JOBS_TEST_STORE")
KINDS = [_ONLY] if _ONLY else _KINDS

CAP = 20.0  # seconds: the fail_after of every test here


def make_factory(kind: str, tmp_path: Path) -> StoreFactory:
    """A callable giving a new store object on the same data each time (a "restart")."""
    if kind == "memory":
        mem = MemoryStore()
        return lambda: mem
    if kind == "sqlite":
        path = tmp_path / "jobs.db"
        return lambda: SQLiteStore(path)
    if kind == "postgres":
        dsn = pg.dsn_or_skip()
        schema = pg.fresh_schema()
        return lambda: PostgresStore(dsn, schema=schema)
    raise ValueError(f"unknown store kind {kind!r} (TRIO_JOBS_TEST_STORE)")


@pytest.fixture(params=KINDS)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    return make_factory(request.param, tmp_path)


async def ticking(job_id: str, payload: Any) -> None:
    """Narrate ``payload["n"]`` events, then fail, hang or return as the payload says."""
    for i in range(payload.get("n", 3)):
        narrate("tick", f"tick {i}", i=i)
    if payload.get("fail"):
        raise RuntimeError(payload["fail"])
    if payload.get("hang"):
        await trio.sleep_forever()
    if payload.get("sleep"):
        await trio.sleep(payload["sleep"])


def running_record(job_id: str, *, attempts: int = 1, retry: RetryPolicy | None = None) -> Any:
    now = time.time()
    return JobRecord(
        id=job_id,
        state=JobState.RUNNING,
        error=None,
        payload={"n": 1},
        timeout=None,
        priority=Priority.NORMAL,
        tags={"team": "a"},
        metadata={"m": 1},
        attempts=attempts,
        created_at=now - 5,
        started_at=now - 4,
        finished_at=None,
        retry=retry,
    )


async def write_crashed(store: JobStore, record: JobRecord, events: int, first: int = 1) -> None:
    """Leave ``store`` as a process that died mid-job would: RUNNING, with ``events``
    events from id ``first`` on (a later first id: the older ones were pruned)."""
    history = (
        Transition(JobState.QUEUED, record.created_at),
        Transition(JobState.RUNNING, record.started_at or 0, "started"),
    )
    batch = WriteBatch(
        jobs=[
            JobWrite(
                record,
                history,
                None,
                check_json("payload", record.payload),
                check_json("metadata", record.metadata),
                first=True,
            )
        ],
        events=[
            NarrationEvent(i, record.id, time.time(), "trio-jobs", "tick", f"tick {i}", {"i": i})
            for i in range(first, first + events)
        ],
    )
    async with store:
        await store.write(batch)


# ---- the store interface itself ---------------------------------------------------------


async def test_schema_version_is_recorded_once(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        store = stores()
        async with store:
            version = await store.schema_version()
        async with stores() as again:
            assert await again.schema_version() == version
    if isinstance(store, SQLiteStore):
        assert version == MIGRATIONS[-1][0]
    elif isinstance(store, PostgresStore):
        assert version == PG_MIGRATIONS[-1][0]
    else:
        assert version == 1


async def test_closed_store_refuses_calls(stores: StoreFactory) -> None:
    store = stores()
    with pytest.raises(trio.ClosedResourceError):
        await store.load_jobs()


async def test_round_trip_of_records_history_and_events(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        policy = RetryPolicy(max_attempts=4, backoff_base=0.5, retry_on=(KeyError,))
        record = running_record("job-x", attempts=2, retry=policy)
        await write_crashed(stores(), record, events=3)
        async with stores() as store:
            [stored] = await store.load_jobs()
            got = await store.load_job("job-x")
            assert await store.load_job("job-missing") is None
            events = await store.load_events("job-x")
            tail = await store.load_events("job-x", limit=2)
            after = await store.load_events("job-x", after=2)
            both = await store.load_job_and_events("job-x", limit=2)
            assert await store.load_job_and_events("job-missing") is None
    assert got == stored
    assert both == (stored, tail)
    assert stored.record == record
    assert stored.record.retry is not None and stored.record.retry.retry_on == (KeyError,)
    assert [t.state for t in stored.history] == [JobState.QUEUED, JobState.RUNNING]
    assert stored.history[1].reason == "started"
    assert [e.id for e in events] == [1, 2, 3]
    assert events[0].fields == {"i": 1} and events[0].human == "tick 1"
    assert [e.id for e in tail] == [2, 3]
    assert [e.id for e in after] == [3]


async def test_later_writes_update_state_but_keep_payload(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        record = running_record("job-y")
        await write_crashed(stores(), record, events=0)
        done = JobRecord(
            **{
                **{k: getattr(record, k) for k in JobRecord.__dataclass_fields__},
                "state": JobState.FAILED,
                "error": "boom",
                "finished_at": time.time(),
                "payload": None,
            }
        )
        async with stores() as store:
            before = await store.load_job("job-y")
            assert before is not None
            stored_history = (*before.history, Transition(JobState.FAILED, time.time(), "boom"))
            await store.write(WriteBatch(jobs=[JobWrite(done, stored_history)]))
            stored = await store.load_job("job-y")
            recent = await store.load_jobs(finished_since=time.time() - 60)
            none = await store.load_jobs(finished_since=time.time() + 60)
    assert stored is not None
    assert stored.record.state is JobState.FAILED and stored.record.error == "boom"
    assert stored.record.payload == {"n": 1}
    assert stored.record.metadata == {"m": 1}
    assert stored.history == stored_history
    assert [s.record.id for s in recent] == ["job-y"]
    assert none == []


# ---- persistence through the registry -----------------------------------------------------


async def test_outcomes_survive_a_restart(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        async with open_registry(stores(), interval=0.005) as reg:
            async with open_job_runner(reg, ticking):
                ok = reg.create_job({"n": 3}, tags={"k": "v"}, metadata={"m": [1, 2]})
                bad = reg.create_job({"n": 1, "fail": "boom"}, priority="high")
                slow = reg.create_job({"n": 2, "sleep": 5}, timeout=0.05)
                hung = reg.create_job({"n": 0, "hang": True})
                for job_id in (ok, bad, slow):
                    await reg.wait(job_id)
                assert reg.cancel_job(hung)
                await reg.wait(hung)
                before = {r.id: r for r in reg.list_jobs()}
                histories = {job_id: reg.history(job_id) for job_id in before}
        async with open_registry(stores()) as again:
            after = {r.id: r for r in again.list_jobs()}
            assert after == before
            assert {job_id: again.history(job_id) for job_id in after} == histories
            assert again.get(slow).error == "Job timed out after 0.05s"
            assert again.list_jobs(tag="k:v") == [before[ok]]
            assert await collect(again, ok) == [
                *[e.wire for e in reg.events(ok)],
                "[DONE]",
            ]
            assert (await collect(again, bad))[-1] == "[ERROR] boom"
            assert (await collect(again, slow))[-1] == "[ERROR] Job timed out after 0.05s"
            assert await collect(again, hung) == ["[CANCELLED]"]
            assert (await collect(again, ok, after=2))[0].startswith('{"id":3,')


async def test_running_job_is_interrupted_on_recovery(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        await write_crashed(stores(), running_record("job-r"), events=2)
        async with open_registry(stores()) as reg:
            record = reg.get("job-r")
            assert record.state is JobState.FAILED
            assert record.error == INTERRUPTED
            lines = await collect(reg, "job-r")
            assert [t.state for t in reg.history("job-r")] == [
                JobState.QUEUED,
                JobState.RUNNING,
                JobState.FAILED,
            ]
        assert len(lines) == 3
        assert lines[0].startswith('{"id":1,') and lines[1].startswith('{"id":2,')
        assert lines[2] == "[ERROR] interrupted"
        async with stores() as store:
            stored = await store.load_job("job-r")
        assert stored is not None
        assert stored.record.state is JobState.FAILED
        assert stored.history[-1] == Transition(JobState.FAILED, stored.history[-1].at, INTERRUPTED)


async def test_running_job_with_attempts_left_is_requeued(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        policy = RetryPolicy(max_attempts=3, backoff_base=0)
        await write_crashed(stores(), running_record("job-q", retry=policy), events=1)
        async with open_registry(stores(), interval=0.005) as reg:
            assert reg.get("job-q").state is JobState.QUEUED
            async with open_job_runner(reg, ticking):
                record = await reg.wait("job-q")
            lines = await collect(reg, "job-q")
        assert record.state is JobState.COMPLETED
        assert record.attempts == 2
        # the stored event 1, then the new attempt's event, numbered on from it
        assert [line[:8] for line in lines] == ['{"id":1,', '{"id":2,', "[DONE]"]
        reasons = [t.reason for t in record_history(reg, "job-q")]
        assert any(r and r.startswith("interrupted; re-queued for attempt 2 of 3") for r in reasons)
        async with open_registry(stores()) as again:
            assert again.get("job-q").state is JobState.COMPLETED
            assert await collect(again, "job-q") == lines


async def test_requeued_job_with_a_pruned_log_keeps_its_log_size(stores: StoreFactory) -> None:
    """Stored events 8..12 only (pruned under a smaller event_log_size): restored with
    their ids, and the job's next attempt still has the whole event_log_size."""
    with trio.fail_after(CAP):
        policy = RetryPolicy(max_attempts=2, backoff_base=0)
        record = dataclasses.replace(running_record("job-p", retry=policy), payload={"n": 12})
        await write_crashed(stores(), record, events=5, first=8)
        async with open_registry(stores(), event_log_size=10, interval=0.005) as reg:
            assert reg.get("job-p").state is JobState.QUEUED
            restored = await collect_open(reg, "job-p")
            async with open_job_runner(reg, ticking):
                await reg.wait("job-p")
            assert [e.id for e in reg.events("job-p")] == list(range(15, 25))
            lines = await collect(reg, "job-p")
    assert [json.loads(line)["id"] for line in restored] == [8, 9, 10, 11, 12]
    assert [json.loads(line)["id"] for line in lines[:-1]] == list(range(15, 25))
    assert lines[-1] == "[DONE]"


async def collect_open(reg: JobRegistry, job_id: str) -> list[str]:
    """What a subscriber reads of a job that has not finished, up to now."""
    async with reg.subscribe(job_id) as stream:
        return [item.wire for item in stream.receive_batch()]


def record_history(reg: JobRegistry, job_id: str) -> list[Transition]:
    return reg.history(job_id)


async def test_queued_jobs_come_back_in_priority_order(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        async with open_registry(stores()) as reg:
            ids = [
                reg.create_job({"n": 0}, priority=p)
                for p in ("low", "normal", "critical", "normal", "high")
            ]
            expired = reg.create_job({"n": 0}, expires=0.05)
        await trio.sleep(0.1)
        order: list[str] = []

        async def record_order(job_id: str, payload: Any) -> None:
            order.append(job_id)

        async with open_registry(stores()) as again:
            assert {r.state for r in again.list_jobs()} == {JobState.QUEUED}
            async with open_job_runner(again, record_order, max_concurrent=1):
                for job_id in ids:
                    await again.wait(job_id)
                assert (await again.wait(expired)).state is JobState.FAILED
        assert order == [ids[2], ids[4], ids[1], ids[3], ids[0]]


async def test_run_jobs_recovers_and_persists_a_registry_with_a_store(
    stores: StoreFactory,
) -> None:
    with trio.fail_after(CAP):
        await write_crashed(stores(), running_record("job-old"), events=0)
        reg = JobRegistry(store=stores())
        async with open_job_runner(reg, ticking):
            assert reg.get("job-old").error == INTERRUPTED
            new = reg.create_job({"n": 2})
            await reg.wait(new)
        async with stores() as store:
            stored = await store.load_job(new)
            events = await store.load_events(new)
        assert stored is not None and stored.record.state is JobState.COMPLETED
        assert [e.id for e in events] == [1, 2]


async def test_shutdown_writes_jobs_cancelled_by_the_runner(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        reg = JobRegistry(store=stores())
        async with open_job_runner(reg, ticking):
            hung = reg.create_job({"n": 1, "hang": True})
            while reg.get(hung).state is not JobState.RUNNING:
                await trio.sleep(0.001)
        async with stores() as store:
            stored = await store.load_job(hung)
        assert stored is not None
        assert stored.record.state is JobState.CANCELLED
        assert stored.history[-1].state is JobState.CANCELLED


async def test_writes_are_batched(stores: StoreFactory) -> None:
    writes = 0

    class Counting(JobStore):
        def __init__(self, inner: JobStore) -> None:
            self.inner = inner

        async def open(self) -> None:
            await self.inner.open()

        async def aclose(self) -> None:
            await self.inner.aclose()

        async def write(self, batch: WriteBatch) -> None:
            nonlocal writes
            writes += 1
            await self.inner.write(batch)

        async def load_jobs(self, *, finished_since: float | None = None) -> Any:
            return await self.inner.load_jobs(finished_since=finished_since)

        async def load_job(self, job_id: str) -> Any:
            return await self.inner.load_job(job_id)

        async def load_events(
            self, job_id: str, *, after: int = 0, limit: int | None = None
        ) -> Any:
            return await self.inner.load_events(job_id, after=after, limit=limit)

        async def schema_version(self) -> int:
            return await self.inner.schema_version()

    with trio.fail_after(CAP):
        async with open_registry(Counting(stores()), interval=0.05) as reg:
            async with open_job_runner(reg, ticking):
                ids = [reg.create_job({"n": 100}) for _ in range(50)]
                for job_id in ids:
                    await reg.wait(job_id)
        async with stores() as store:
            assert len(await store.load_jobs()) == 50
            assert len(await store.load_events(ids[-1])) == 100
    # 50 jobs x (3 transitions + 100 events) went out in a handful of transactions
    assert 1 <= writes <= 10


async def test_stored_event_log_is_bounded_and_resumable(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        async with open_registry(stores(), event_log_size=5, interval=0.005) as reg:
            async with open_job_runner(reg, ticking):
                job_id = reg.create_job({"n": 12})
                await reg.wait(job_id)
        async with stores() as store:
            assert [e.id for e in await store.load_events(job_id)] == [8, 9, 10, 11, 12]
        async with open_registry(stores(), event_log_size=5) as again:
            lines = await collect(again, job_id)
            resumed = await collect(again, job_id, after=10)
        assert [json.loads(line)["id"] for line in lines[:-1]] == [8, 9, 10, 11, 12]
        assert lines[-1] == "[DONE]"
        assert [json.loads(line)["id"] for line in resumed[:-1]] == [11, 12]
        assert resumed[-1] == "[DONE]"


async def test_retention_drops_from_memory_but_fetch_reads_the_store(
    stores: StoreFactory,
) -> None:
    with trio.fail_after(CAP):
        async with open_registry(stores(), retention=0.05, interval=0.005) as reg:
            async with open_job_runner(reg, ticking):
                job_id = reg.create_job({"n": 1})
                await reg.wait(job_id)
                await trio.sleep(0.1)
                reg.create_job({"n": 0})  # creating purges what is past retention
                with pytest.raises(JobNotFound):
                    reg.get(job_id)
                record = await reg.fetch(job_id)
                assert record.state is JobState.COMPLETED
                with pytest.raises(JobNotFound):
                    await reg.fetch("job-unknown")
        async with open_registry(stores(), retention=0.05) as again:
            assert job_id not in again  # past retention: not loaded into memory
            assert (await again.fetch(job_id)).state is JobState.COMPLETED


async def test_payload_must_be_json_with_a_store(stores: StoreFactory) -> None:
    with trio.fail_after(CAP):
        async with open_registry(stores()) as reg:
            with pytest.raises(ValueError, match="payload must be JSON-serialisable"):
                reg.create_job({"when": object()})
            with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
                reg.create_job({}, metadata={1, 2})
            assert len(reg) == 0
    plain = JobRegistry()
    plain.create_job(object())  # without a store anything goes


async def test_store_failure_is_retried_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    failing = [True]

    class Flaky(MemoryStore):
        async def write(self, batch: WriteBatch) -> None:
            if failing[0]:
                failing[0] = False
                raise OSError("disk on fire")
            await super().write(batch)

    store = Flaky()
    with trio.fail_after(CAP):
        async with open_registry(store, interval=0.005) as reg:
            async with open_job_runner(reg, ticking):
                job_id = reg.create_job({"n": 2})
                await reg.wait(job_id)
        async with store:
            stored = await store.load_job(job_id)
    assert stored is not None and stored.record.state is JobState.COMPLETED
    assert "disk on fire" in caplog.text


async def test_persistence_cannot_run_twice() -> None:
    reg = JobRegistry(store=MemoryStore())
    async with trio.open_nursery() as nursery:
        await nursery.start(run_persistence, reg)
        with pytest.raises(RuntimeError, match="already being persisted"):
            await run_persistence(reg)
        nursery.cancel_scope.cancel()
    with pytest.raises(ValueError, match="no store"):
        await run_persistence(JobRegistry())


@pytest.mark.parametrize("kind", KINDS)
async def test_persist_every_registry_under_an_autojump_clock(
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    pg.persist_every_registry(kind, monkeypatch, tmp_path)
    reg = JobRegistry(retention=600)
    assert reg.store is not None
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 2, "sleep": 100})
        record = await reg.wait(job_id)
    # 100 s of virtual time passed and nothing else: database calls made no leaps
    assert trio.current_time() == pytest.approx(100, abs=0.5)
    assert record.state is JobState.COMPLETED
    assert (await collect(reg, job_id))[-1] == "[DONE]"
    store = reg.store
    async with store:
        stored = await store.load_job(job_id)
    assert stored is not None and stored.record.state is JobState.COMPLETED


def test_json_codec_without_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_jobs import _json

    monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson now fails
    strict, lenient, loads = _json._codec()
    assert loads(strict({"a": [1, 2.5, None, "é", "\x00", "\ud800"]})) == {
        "a": [1, 2.5, None, "é", "\x00", "\ud800"]
    }
    with pytest.raises(TypeError):
        strict({"a": object()})
    assert loads(lenient({"when": Path("/x")})) == {"when": "/x"}


async def test_event_fields_json_cannot_hold_are_stored_as_text(stores: StoreFactory) -> None:
    async def odd(job_id: str, payload: Any) -> None:
        narrate("odd", "a path", where=Path("/tmp/x"), n=1)

    with trio.fail_after(CAP):
        async with open_registry(stores(), interval=0.005) as reg:
            async with open_job_runner(reg, odd):
                job_id = reg.create_job({})
                await reg.wait(job_id)
        async with stores() as store:
            [event] = await store.load_events(job_id)
    assert event.fields == {"where": "/tmp/x", "n": 1}


async def test_big_batches_round_trip(stores: StoreFactory) -> None:
    """Big batches take another path in some stores (PostgreSQL copies them)."""
    records = [running_record(f"job-{i:03d}") for i in range(120)]
    history = (Transition(JobState.RUNNING, time.time(), "started"),)
    first = WriteBatch(
        jobs=[
            JobWrite(
                r, history, None, check_json("p", r.payload), check_json("m", r.metadata), True
            )
            for r in records
        ],
        events=[
            NarrationEvent(i, r.id, 1.5, "a", "tick", f"{r.id} {i}", {"i": i})
            for r in records
            for i in (1, 2)
        ],
    )
    done = [dataclasses.replace(r, state=JobState.COMPLETED, finished_at=2.0) for r in records]
    second = WriteBatch(
        jobs=[JobWrite(r, (*history, Transition(JobState.COMPLETED, 2.0))) for r in done]
    )
    with trio.fail_after(CAP):
        async with stores() as store:
            await store.write(first)
            await store.write(first)  # a retried batch changes nothing
            await store.write(second)
            loaded = await store.load_jobs()
            events = await store.load_events("job-007")
    assert [s.record for s in loaded] == done
    assert all(len(s.history) == 2 for s in loaded)
    assert [(e.id, e.human, e.fields) for e in events] == [
        (1, "job-007 1", {"i": 1}),
        (2, "job-007 2", {"i": 2}),
    ]


async def test_idle_running_jobs_cost_no_flushes(autojump_clock: trio.testing.MockClock) -> None:
    """Quiet running jobs wake the flusher for nothing; their next event is still written
    (each collected log is re-armed), and so is their end."""
    store = MemoryStore()
    go = [trio.Event() for _ in range(3)]

    async def stepwise(job_id: str, payload: Any) -> None:
        for i, event in enumerate(go):
            narrate("step", f"step {i}")
            await event.wait()

    async with open_registry(store, interval=0.02) as reg:
        persister = persister_of(reg)
        assert persister is not None
        async with open_job_runner(reg, stepwise):
            ids = [reg.create_job({}) for _ in range(50)]
            await trio.sleep(1)
            rounds, writes = persister.rounds, store.writes
            await trio.sleep(100)  # 5,000 flush intervals with 50 jobs running quietly
            assert (persister.rounds, store.writes) == (rounds, writes)
            assert not persister.pending
            for event in go[:2]:
                event.set()
                await trio.sleep(1)
                assert persister.rounds - rounds <= 2
                rounds = persister.rounds
            for job_id in ids:
                assert [e.id for e in await store.load_events(job_id)] == [1, 2, 3]
            go[2].set()
            for job_id in ids:
                await reg.wait(job_id)
            await trio.sleep(1)
    async with store:
        for job_id in ids:
            stored = await store.load_job(job_id)
            assert stored is not None and stored.record.state is JobState.COMPLETED
