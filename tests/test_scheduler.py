"""The queen's worker table: heartbeats, liveness by TTL, picking a worker, waiting for a
slot in turn; and the queen's ``infer`` waiting for one (virtual time)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from servers.operations import Infer
from servers.queen import NoWorker, Queen, QueenConfig, WorkersBusy, WorkerTable
from servers.queen._openai import Progress, ResponseView
from trio_jobs import JobRegistry, open_job_runner


def beat(table: WorkerTable, worker_id: str, model: str = "tiny", **extra: Any) -> None:
    table.beat(
        {"worker_id": worker_id, "url": f"http://127.0.0.1/{worker_id}", "model": model, **extra}
    )


async def test_pick_prefers_the_least_busy_live_worker(autojump_clock: trio.abc.Clock) -> None:
    table = WorkerTable(ttl_s=5)
    beat(table, "w1", running=2)
    beat(table, "w2", running=0)
    beat(table, "w3", model="other")
    assert (await table.pick("tiny", None, wait_s=0)).worker_id == "w2"
    table.assigned["w2"] = 3
    assert (await table.pick("tiny", None, wait_s=0)).worker_id == "w1"
    beat(table, "w4", hive_id="gpu")
    assert (await table.pick("tiny", "gpu", wait_s=0)).worker_id == "w4"


async def test_workers_expire_after_the_ttl(autojump_clock: trio.abc.Clock) -> None:
    table = WorkerTable(ttl_s=5)
    beat(table, "w1")
    await trio.sleep(4.9)
    assert [w.worker_id for w in table.live()] == ["w1"]
    await trio.sleep(0.2)
    assert table.live() == []
    with pytest.raises(NoWorker, match="no live worker serves model 'tiny'"):
        await table.pick("tiny", None, wait_s=1)


async def test_stopping_removes_a_worker_at_once(autojump_clock: trio.abc.Clock) -> None:
    table = WorkerTable(ttl_s=5)
    beat(table, "w1")
    beat(table, "w1", state="stopping")
    assert table.live() == []


async def test_pick_waits_for_a_worker_to_appear(autojump_clock: trio.abc.Clock) -> None:
    table = WorkerTable(ttl_s=5)
    async with trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(2)
            beat(table, "late", model="other")
            await trio.sleep(1)
            beat(table, "late2")

        nursery.start_soon(later)
        start = trio.current_time()
        picked = await table.pick("tiny", None, wait_s=10)
        assert picked.worker_id == "late2"
        assert trio.current_time() - start == pytest.approx(3)


async def test_no_worker_names_the_live_ones(autojump_clock: trio.abc.Clock) -> None:
    table = WorkerTable(ttl_s=5)
    beat(table, "w9", model="llama")
    start = trio.current_time()
    with pytest.raises(NoWorker) as info:
        await table.pick("tiny", "gpu", wait_s=2)
    assert trio.current_time() - start == pytest.approx(2)
    assert str(info.value) == (
        "no live worker serves model 'tiny' on hive 'gpu' (live workers: w9 (llama); "
        "spawn one with worker_spawn)"
    )


async def test_liveness_of_stopping_and_not_ready_workers(autojump_clock: trio.abc.Clock) -> None:
    """``is_live`` follows heartbeats only: a stopping worker (whose jobs are ending with
    their own signals) stays live while it beats, but neither it nor a ``not_ready`` one is
    picked; a forgotten worker is not picked until its next heartbeat (but stays live for
    the jobs it runs)."""
    table = WorkerTable(ttl_s=5)
    beat(table, "w1", state="stopping")
    beat(table, "w2", state="not_ready")
    assert (table.is_live("w1"), table.status("w1")) == (True, "stopping")
    assert (table.is_live("w2"), table.status("w2")) == (True, "not_ready")
    with pytest.raises(NoWorker, match=r"live workers: w2 \(tiny, not_ready\)"):
        await table.pick("tiny", None, wait_s=1)
    await trio.sleep(5.1)
    assert not table.is_live("w1") and table.status("w2") is None
    beat(table, "w3")
    table.forget("w3")
    assert table.is_live("w3") and table.live() == []
    with pytest.raises(NoWorker):
        await table.pick("tiny", None, wait_s=0)
    beat(table, "w3", state="busy")
    assert (await table.pick("tiny", None, wait_s=0)).worker_id == "w3"


async def test_heartbeats_heard_by_other_queens_merge_by_age(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Beats another queen recorded join the table with their age; a worker forgotten
    here is scheduled again only after a beat newer than the forgetting (it stays live
    meanwhile); ``pick`` asks for fresh beats before it waits."""
    import time

    table = WorkerTable(ttl_s=5)
    remote = {"worker_id": "w1", "url": "http://127.0.0.1/w1/", "model": "tiny"}
    table.merge([(remote, time.time() - 4.0, "a")])
    assert table.is_live("w1") and table.snapshot()[0]["via"] == "a"
    await trio.sleep(1.1)
    assert not table.is_live("w1")  # 4 s old when heard, so past the 5 s TTL now
    table.merge([(remote, time.time(), "a")])
    table.forget("w1")
    table.merge([(remote, time.time() - 1.0, "a")])
    assert table.is_live("w1") and table.live_for("tiny") == []
    await trio.sleep(0.5)
    table.merge([(remote, time.time(), "a")])
    assert [w.worker_id for w in table.live_for("tiny")] == ["w1"]

    beat(table, "w2", running=3)
    assert [w.worker_id for w in table.live_for("tiny")] == ["w1", "w2"]

    asked: list[int] = []

    async def refresh() -> None:
        asked.append(1)
        table.merge([({**remote, "worker_id": "w3", "model": "big"}, time.time(), "b")])

    table.refresh = refresh
    assert (await table.pick("big", None, wait_s=1)).worker_id == "w3"
    assert asked == [1]


async def test_take_respects_capacity_and_reserves_the_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker at its advertised capacity is not taken; ``take`` counts the job at once
    (two takers never get one free slot), ``release`` frees it and wakes a waiter; a
    worker advertising no capacity has no limit."""
    table = WorkerTable(ttl_s=5)
    beat(table, "w1", capacity=2)
    assert [(await table.take("tiny", None, 0)).worker_id for _ in range(2)] == ["w1", "w1"]
    assert table.assigned == {"w1": 2}
    start = trio.current_time()
    with pytest.raises(WorkersBusy) as info:
        await table.take("tiny", None, wait_s=3)
    assert trio.current_time() - start == pytest.approx(3)
    assert str(info.value) == (
        "all 1 live worker(s) serving model 'tiny' stayed at capacity for 3s (w1 2/2 jobs)"
    )
    assert isinstance(info.value, NoWorker) and table.assigned == {"w1": 2}

    taken: list[str] = []

    async def taker() -> None:
        taken.append((await table.take("tiny", None, wait_s=10)).worker_id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        nursery.start_soon(taker)
        await trio.sleep(1)
        assert taken == []
        table.release("w1")
        await trio.testing.wait_all_tasks_blocked()
        assert taken == ["w1"] and table.assigned == {"w1": 2}
        beat(table, "w2")  # no capacity advertised: no limit
    assert taken == ["w1", "w2"]
    with pytest.raises(NoWorker) as none:
        await table.take("other", None, wait_s=0)
    assert not isinstance(none.value, WorkersBusy)


async def test_capacity_counts_what_the_worker_ran_for_others(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker's load is this queen's jobs there now plus what its last heartbeat ran
    beyond them (another queen's jobs): ``running`` 3 of which 1 ours leaves 2 foreign."""
    table = WorkerTable(ttl_s=5)
    beat(table, "w1", capacity=3)
    await table.take("tiny", None, 0)
    beat(table, "w1", capacity=3, running=3)
    [entry] = table.live()
    assert (entry.foreign, table.load(entry), table.has_room(entry)) == (2, 3, False)
    table.release("w1")
    assert (table.load(entry), table.has_room(entry)) == (2, True)
    assert table.snapshot()[0]["capacity"] == 3
    cancelled = trio.CancelScope()
    with cancelled:
        await table.take("tiny", None, 0)
        beat(table, "w1", capacity=3, running=3)  # 3 running, 1 of them ours: full
        cancelled.cancel()
        await table.take("tiny", None, 10)
    assert table.assigned == {"w1": 1}  # the cancelled take reserved nothing


async def test_waiters_get_freed_slots_in_arrival_order(autojump_clock: trio.abc.Clock) -> None:
    """Takes waiting on a full worker are served oldest first, one per freed slot, and a
    newcomer never gets a slot that an older waiter is owed."""
    table = WorkerTable(ttl_s=100)
    beat(table, "w1", capacity=2)
    await table.take("tiny", None, 0)
    await table.take("tiny", None, 0)
    served: list[str] = []

    async def taker(name: str) -> None:
        await table.take("tiny", None, wait_s=50)
        served.append(name)

    async with trio.open_nursery() as nursery:
        for name in "abcde":
            nursery.start_soon(taker, name)
            await trio.testing.wait_all_tasks_blocked()  # queued in this order
        assert table.waiting == 5
        table.release("w1")
        with pytest.raises(WorkersBusy):  # the freed slot is a's, not a newcomer's
            await table.take("tiny", None, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert served == ["a"]
        table.release("w1")
        table.release("w1")  # b's and c's (resumed in any order: trio's choice)
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(served) == ["a", "b", "c"]
        beat(table, "w1", capacity=4, running=3)  # 4 at once now; 1 of 3 not ours
        await trio.testing.wait_all_tasks_blocked()
        assert served[3:] == ["d"]  # one slot: d's
        beat(table, "w2", capacity=1)
    assert served[3:] == ["d", "e"]
    assert table.assigned == {"w1": 3, "w2": 1} and table.waiting == 0


async def test_a_slot_goes_to_the_oldest_waiter_that_can_use_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A waiter that cannot use a freed slot (another model, another hive) does not hold
    it up: the slot goes to the oldest waiter it suits; the others keep their places."""
    table = WorkerTable(ttl_s=100)
    beat(table, "cpu", capacity=1)
    beat(table, "gpu", capacity=1, hive_id="gpu")
    beat(table, "big", model="big", capacity=1)
    for model in ("tiny", "tiny", "big"):
        await table.take(model, None, 0)
    served: list[str] = []

    async def taker(name: str, model: str, hive_id: str | None) -> None:
        entry = await table.take(model, hive_id, wait_s=50)
        served.append(f"{name}@{entry.worker_id}")

    async with trio.open_nursery() as nursery:
        for name, model, hive_id in [
            ("a", "big", None),
            ("b", "tiny", "gpu"),
            ("c", "tiny", None),
            ("d", "tiny", "gpu"),
            ("e", "tiny", None),
        ]:
            nursery.start_soon(taker, name, model, hive_id)
            await trio.testing.wait_all_tasks_blocked()
        table.release("cpu")  # a wants another model, b and d another hive: c's
        await trio.testing.wait_all_tasks_blocked()
        assert served == ["c@cpu"]
        table.release("gpu")  # b is the oldest that can use it (before e, which could)
        await trio.testing.wait_all_tasks_blocked()
        assert served == ["c@cpu", "b@gpu"]
        for worker in ("gpu", "cpu", "big"):
            table.release(worker)
            await trio.testing.wait_all_tasks_blocked()
    assert served == ["c@cpu", "b@gpu", "d@gpu", "e@cpu", "a@big"]


async def test_waiters_that_give_up_leave_the_queue_and_lose_no_slot(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A waiter that times out or is cancelled leaves the queue without a slot (the next
    freed slot goes to the next waiter); one cancelled after it was handed a slot (here
    while it asked another queen's beats) gives it back to the next in line."""
    table = WorkerTable(ttl_s=100)
    beat(table, "w1", capacity=1)
    await table.take("tiny", None, 0)
    served: list[str] = []
    scopes: dict[str, trio.CancelScope] = {}

    async def taker(name: str, wait_s: float) -> None:
        with trio.CancelScope() as scopes[name]:
            try:
                await table.take("tiny", None, wait_s)
            except WorkersBusy:
                served.append(f"{name} gave up")
                return
            served.append(name)
            return
        served.append(f"{name} cancelled")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker, "timeout", 1.0)
        await trio.testing.wait_all_tasks_blocked()
        for name in ("cancel", "next"):
            nursery.start_soon(taker, name, 50.0)
            await trio.testing.wait_all_tasks_blocked()
        scopes["cancel"].cancel()
        with pytest.raises(WorkersBusy):
            await table.take("tiny", None, 0)
        await trio.sleep(2)
        assert served == ["cancel cancelled", "timeout gave up"]
        assert table.waiting == 1 and table.assigned == {"w1": 1}
        table.release("w1")
        await trio.testing.wait_all_tasks_blocked()
        assert served[2:] == ["next"]

        async def slow_refresh() -> None:
            await trio.sleep(10)

        table.refresh = slow_refresh
        nursery.start_soon(taker, "asking", 50.0)  # waits in refresh: no free slot
        await trio.testing.wait_all_tasks_blocked()
        table.refresh = None
        nursery.start_soon(taker, "last", 50.0)
        await trio.testing.wait_all_tasks_blocked()
        table.release("w1")  # handed to "asking", still in its refresh...
        assert table.assigned == {"w1": 1} and table.waiting == 1
        scopes["asking"].cancel()  # ...which is cancelled: the slot goes on to "last"
        await trio.testing.wait_all_tasks_blocked()
    assert served[3:] == ["asking cancelled", "last"]
    assert table.assigned == {"w1": 1} and table.waiting == 0


async def test_a_background_infer_waits_for_a_slot_until_its_bound(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While its model's only worker is full, a plain ``infer`` fails after the queen's
    ``schedule_wait_s``; a background one waits until its job's timeout, then fails
    ``Job timed out`` having said why it never started (and its response says so, as a
    rate limit); a queued one that is cancelled leaves the queue with no slot."""
    registry = JobRegistry(actor="queen")
    async with trio.open_nursery() as nursery:
        queen = Queen(QueenConfig(heartbeat_ttl_s=1000, schedule_wait_s=1), registry, nursery)
        beat(queen.workers, "w1", capacity=1, running=1)  # full with another queen's job
        background = Infer(model="tiny", prompt="x", background=True).to_body()
        async with open_job_runner(registry, queen.execute):
            start = trio.current_time()
            bg = await registry.submit(background, timeout=30)
            plain = await registry.submit(Infer(model="tiny", prompt="x").to_body())
            cancelled = await registry.submit(background, timeout=30)
            assert (await registry.wait(plain)).error == (
                "all 1 live worker(s) serving model 'tiny' stayed at capacity for 1s (w1 1/1 jobs)"
            )
            assert trio.current_time() - start == pytest.approx(1)
            assert queen.workers.waiting == 2
            assert registry.cancel_job(cancelled)
            assert (await registry.wait(cancelled)).state.value == "cancelled"
            record = await registry.wait(bg)
            assert trio.current_time() - start == pytest.approx(30, abs=0.1)
        nursery.cancel_scope.cancel()
    assert record.error == "Job timed out after 30s"
    assert queen.workers.waiting == 0 and queen.workers.assigned == {}
    events = registry.events(bg)
    [why] = [e for e in events if e.action == "infer_unscheduled"]
    assert why.fields["busy"] is True
    assert why.human.startswith("all 1 live worker(s) serving model 'tiny' stayed at capacity")
    view = ResponseView(
        "resp_" + bg, {"background": True, "timeout_s": 30}, 0, Progress(), error=record.error
    )
    for event in events:
        view.progress.feed(event)
    assert view.failure_detail() == {
        "code": "rate_limit_exceeded",
        "message": "The response was not started within 30s, this server's limit for "
        f"background responses (background_timeout_s): {why.human}",
    }
