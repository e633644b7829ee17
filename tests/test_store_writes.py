"""How persistence writes, where it was made faster: a job's first attempt shares its
acknowledging commit (and is withdrawn when that commit fails), acknowledgements time out
by one timer per flush, SQLite writes small batches in the loop's thread (and busy or big
ones in its worker thread), event chunks are columns (old rows still read), a persisted
log's ring keeps the events not stored yet."""

from __future__ import annotations

import sqlite3
import time
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import trio
import trio.testing

from trio_jobs import (
    JobRegistry,
    JobState,
    MemoryStore,
    SQLiteStore,
    StoreUnavailable,
    narrate,
    run_jobs,
    run_persistence,
)
from trio_jobs._channel import JobLog
from trio_jobs._models import JobRecord, NarrationEvent, Priority, Transition
from trio_jobs._stores import JobWrite, WriteBatch
from trio_jobs._stores._rows import event_chunks, events_from_chunks

CAP = 20.0


class GatedStore(MemoryStore):
    """A memory store whose writes wait for ``gate`` (when set to one), then fail while
    ``fail`` is set; it records the state of every job row it wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None
        self.fail = False
        self.states: list[tuple[str, JobState]] = []

    async def write(self, batch: WriteBatch) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("connection refused (the test took the store down)")
        await super().write(batch)
        self.states += [(w.record.id, w.record.state) for w in batch.jobs]


async def test_a_first_attempt_shares_the_commit_that_acknowledges_its_job() -> None:
    store = GatedStore()
    ran: list[str] = []

    async def work(job_id: str, payload: Any) -> None:
        ran.append(job_id)
        await trio.lowlevel.checkpoint()

    registry = JobRegistry(store=store)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_jobs, registry, work)
            job_id = await registry.submit({})
            await registry.wait(job_id)
            nursery.cancel_scope.cancel()
    # the row went in already RUNNING: one commit acknowledged it and started its attempt
    assert [state for jid, state in store.states if jid == job_id] == [
        JobState.RUNNING,
        JobState.COMPLETED,
    ]
    assert ran == [job_id]


@pytest.mark.parametrize("how", ["store down", "cancelled"])
async def test_an_unacknowledged_job_whose_attempt_began_never_runs(how: str) -> None:
    """The runner begins the attempt while the acknowledging commit is pending; the
    commit fails (or the submission is cancelled): the job ends FAILED "not
    acknowledged", its executor never runs, and its history shows no start."""
    store = GatedStore()
    ran: list[str] = []

    async def work(job_id: str, payload: Any) -> None:
        ran.append(job_id)
        await trio.lowlevel.checkpoint()

    registry = JobRegistry(store=store)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_jobs, registry, work)
            store.gate = trio.Event()
            store.fail = how == "store down"
            submitted: list[str] = []

            async def submit(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    with pytest.raises(StoreUnavailable):
                        await registry.submit({})
                    submitted.append("raised")

            scope = await nursery.start(submit)
            while registry.running == 0:  # the runner began the attempt; it waits
                await trio.sleep(0.001)
            (job,) = [registry.job(r.id) for r in registry.list_jobs()]
            assert job is not None and job.state is JobState.RUNNING
            if how == "cancelled":
                scope.cancel()  # before the commit: were it after, the job would be stored
                while not job.state.is_terminal:
                    await trio.sleep(0.001)
            store.gate.set()
            while not job.state.is_terminal:
                await trio.sleep(0.001)
            store.gate, store.fail = None, False
            await registry.wait(job.id)  # written once the store is back
            nursery.cancel_scope.cancel()
    reason = "the store was unavailable" if how == "store down" else "the submission was cancelled"
    record = registry.get(job.id)
    assert record.state is JobState.FAILED
    assert record.error == f"not acknowledged: {reason}"
    assert record.attempts == 0 and record.started_at is None
    assert [t.state for t in registry.history(job.id)] == [JobState.QUEUED, JobState.FAILED]
    assert ran == [] and registry.running == 0
    assert submitted == (["raised"] if how == "store down" else [])
    async with store:
        stored = await store.load_job(job.id)
    assert stored is not None and stored.record.state is JobState.FAILED
    assert [t.state for t in stored.history] == [JobState.QUEUED, JobState.FAILED]


async def test_an_acknowledgement_gives_up_after_ack_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = GatedStore()
    registry = JobRegistry(store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_persistence, registry, ack_timeout=2.0, grace=0.1))
        store.gate = trio.Event()  # the write hangs
        start = trio.current_time()
        with pytest.raises(StoreUnavailable, match="did not commit within 2s"):
            await registry.submit({})
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
        (record,) = registry.list_jobs()
        assert record.error == "not acknowledged: the store was unavailable"
        store.gate.set()
        store.gate = None
        assert (await registry.submit({})) in registry
        nursery.cancel_scope.cancel()


def _event(i: int, **kw: Any) -> NarrationEvent:
    fields = kw.pop("fields", {"i": i})
    return NarrationEvent(
        i, "job-1", 1765000000.0 + i / 7, kw.get("actor", "a"), "act", "h", fields
    )


def test_event_chunks_are_columns_and_read_back_exactly() -> None:
    weird = object()
    events = [
        _event(1),
        _event(2, fields=MappingProxyType({})),  # an event without fields
        _event(3, fields=MappingProxyType({"k": "v"})),
        _event(4, actor="other", fields={"x": weird, "big": 1 << 70}),
        _event(5, fields={"s": "lone \ud800 surrogate and \x00"}),
    ]
    (chunk,) = event_chunks(events)
    assert chunk[:3] == ("job-1", 1, 5)
    back = events_from_chunks("job-1", [chunk[3]], 0, None)
    assert [e.id for e in back] == [1, 2, 3, 4, 5]
    assert [e.actor for e in back] == ["a", "a", "a", "other", "a"]
    assert [e.ts for e in back] == [e.ts for e in events]
    assert back[1].fields == {} and back[2].fields == {"k": "v"}
    assert back[3].fields == {"x": str(weird), "big": 1 << 70}
    assert back[4].fields == {"s": "lone \ud800 surrogate and \x00"}
    # ids with a gap (a restored log) and one actor throughout
    gappy = [_event(1), _event(2), _event(9)]
    (chunk,) = event_chunks(gappy)
    assert [e.id for e in events_from_chunks("job-1", [chunk[3]], 1, None)] == [2, 9]
    # one action throughout, actors that differ
    mixed = [_event(1, actor="x"), _event(2, actor="y")]
    (chunk,) = event_chunks(mixed)
    back = events_from_chunks("job-1", [chunk[3]], 0, None)
    assert [(e.actor, e.action) for e in back] == [("x", "act"), ("y", "act")]
    # two jobs' runs in one batch
    other = [NarrationEvent(i, "job-2", 1.0, "a", "act", "h", {}) for i in (1, 2)]
    assert [(c[0], c[1], c[2]) for c in event_chunks([*events, *other])] == [
        ("job-1", 1, 5),
        ("job-2", 1, 2),
    ]


def test_event_chunks_written_by_earlier_versions_are_still_read() -> None:
    old = '[[1,1.5,"a","act","h",{"i":1}],[2,2.5,"a","act","h",null]]'
    back = events_from_chunks("job-1", [old], 0, None)
    assert back == [
        NarrationEvent(1, "job-1", 1.5, "a", "act", "h", {"i": 1}),
        NarrationEvent(2, "job-1", 2.5, "a", "act", "h", {}),
    ]


def test_a_persisted_log_keeps_the_events_not_stored_yet() -> None:
    log = JobLog("job-1", "a", 4)
    log.stored_upto(0)
    for i in range(10):
        log.append("a", "h", {"i": i}, 0.0)
    assert [e.id for e in log.since(0)] == list(range(1, 11))  # nothing was overwritten
    stream = log.open_stream()
    assert [stream.receive_nowait().id for _ in range(10)] == list(range(1, 11))
    log.stored_upto(10)  # stored: back to its capacity, the newest kept
    assert [e.id for e in log.events()] == [7, 8, 9, 10]
    for _ in range(3):
        log.append("a", "h", {}, 0.0)
    assert [e.id for e in log.events()] == [10, 11, 12, 13]
    log.stored_upto(None)  # not persisted: an ordinary ring
    for _ in range(40):
        log.append("a", "h", {}, 0.0)
    assert len(log.events()) == 4
    # growth is bounded: 8x the capacity, then the oldest unstored events go
    bounded = JobLog("job-2", "a", 4)
    bounded.stored_upto(0)
    for _ in range(100):
        bounded.append("a", "h", {}, 0.0)
    assert [e.id for e in bounded.events()] == list(range(69, 101))


def _write(job_id: str, state: JobState, *, first: bool) -> JobWrite:
    now = time.time()
    record = JobRecord(
        id=job_id,
        state=state,
        error=None,
        payload={"p": 1},
        timeout=None,
        priority=Priority.NORMAL,
        tags={},
        metadata=None,
        attempts=1,
        created_at=now,
        started_at=now,
        finished_at=now if state.is_terminal else None,
    )
    history = (Transition(JobState.QUEUED, now), Transition(state, now, "x"))
    return JobWrite(record, history, None, '{"p":1}' if first else None, "null", first=first)


async def test_sqlite_writes_small_batches_in_the_loop_and_waits_for_a_lock_in_a_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    with trio.fail_after(CAP):
        async with SQLiteStore(path) as store:
            await store.write(WriteBatch([_write("job-a", JobState.RUNNING, first=True)]))
            assert store.loop_writes == 1
            # a later write of a row that is missing is upserted, not lost
            await store.write(WriteBatch([_write("job-b", JobState.COMPLETED, first=False)]))
            stored = await store.load_job("job-b")
            assert stored is not None and stored.record.state is JobState.COMPLETED
            assert store.loop_writes == 2
            # another process holds the write lock: the loop does not wait for it, the
            # worker thread does, and writes once it is released
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                nursery.start_soon(
                    store.write, WriteBatch([_write("job-a", JobState.COMPLETED, first=False)])
                )
                await trio.sleep(0.3)
                assert ticks >= 10  # the loop went on meanwhile
                other.execute("COMMIT")
                other.close()
                with trio.fail_after(5):
                    while (s := await store.load_job("job-a")) is None or (
                        s.record.state is not JobState.COMPLETED
                    ):
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert store.loop_writes == 2
            await store.write(WriteBatch([_write("job-c", JobState.RUNNING, first=True)]))
            assert store.loop_writes == 3  # the loop's connection is used again
        async with SQLiteStore(path, synchronous="FULL") as full:
            await full.write(WriteBatch([_write("job-d", JobState.RUNNING, first=True)]))
            assert full.loop_writes == 0  # every commit syncs: never in the loop


async def test_sqlite_checkpoints_what_the_loop_wrote_in_a_thread(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    with trio.fail_after(CAP):
        async with SQLiteStore(path) as store:
            text = "x" * 1000
            for n in range(6):  # about 6 MB of events, past the 4 MB between checkpoints
                events = [
                    NarrationEvent(i, "job-a", 0.0, "a", "act", text, {})
                    for i in range(n * 1000 + 1, n * 1000 + 1001)
                ]
                await store.write(WriteBatch(events=events))
            assert store.loop_writes == 6
            while store.checkpoints < 1:
                await trio.sleep(0.01)
            assert len(await store.load_events("job-a")) == 6000


async def test_a_narrating_job_s_events_all_reach_store_and_reader(tmp_path: Path) -> None:
    """A job narrating flat out into a small log: the reader misses nothing and the store
    holds the newest ``event_log_size`` events (and no more than a chunk besides)."""

    async def chatty(job_id: str, payload: Any) -> None:
        for i in range(20_000):
            narrate("tick", "t", i=i)
            if i % 100 == 99:
                await trio.lowlevel.checkpoint()

    store = SQLiteStore(tmp_path / "jobs.db")
    registry = JobRegistry(store=store, event_log_size=1000)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_jobs, registry, chatty)
            job_id = await registry.submit({})
            stream = registry.open_stream(job_id)
            got = 0
            while True:
                await stream.wait_ready()
                items = stream.receive_batch(4096)
                if not items:
                    break
                got += len(items)
            nursery.cancel_scope.cancel()
    assert got == 20_001 and stream.skipped == 0
    async with SQLiteStore(tmp_path / "jobs.db") as again:
        ids = [e.id for e in await again.load_events(job_id)]
        newest = [e.id for e in await again.load_events(job_id, limit=1000)]
    # the newest 1000 without a gap; older chunks go once all their events may
    assert newest == list(range(19_001, 20_001))
    assert ids == list(range(ids[0], 20_001)) and len(ids) <= 9 * 1000  # a ring at most
