"""The job lifecycle: signals, timeouts, cancellation, scheduling, narration.

Ports of the reference system's timeout/cancellation and done-signal tests, plus the
semantics trio-jobs adds. Time runs on the autojump MockClock: no real sleeps.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

import trio_jobs
from trio_jobs import (
    JobNotFound,
    JobRegistry,
    JobState,
    Priority,
    RetryPolicy,
    TerminalSignal,
    narrate,
    open_job_runner,
)

from .helpers import assert_one_signal_last, collect, drain


async def ticking(job_id: str, payload: Any) -> None:
    """Narrate payload['n'] events, sleeping payload['sleep'] between them."""
    opts = payload or {}
    for i in range(opts.get("n", 3)):
        narrate("token", f"token {i}", n=i)
        await trio.sleep(opts.get("sleep", 0.1))
    if opts.get("raise"):
        raise ValueError(opts["raise"])
    if opts.get("hang"):
        await trio.sleep_forever()


# ---- the reference's 12 timeout / cancellation tests ---------------------------------


async def test_job_timeout(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        start = trio.current_time()
        job_id = reg.create_job({"n": 1, "hang": True}, timeout=2)
        lines = await collect(reg, job_id)
        assert trio.current_time() - start == pytest.approx(2)
    assert lines[-1] == "[ERROR] Job timed out after 2s"
    record = reg.get(job_id)
    assert record.state is JobState.FAILED
    assert record.error == "Job timed out after 2s"


async def test_job_completes_before_timeout(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 3}, timeout=5)
        lines = await collect(reg, job_id)
    assert lines[-1] == "[DONE]"
    assert len(lines) == 4
    assert reg.get(job_id).state is JobState.COMPLETED


async def test_job_cancellation(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 1, "hang": True})
        async with reg.subscribe(job_id) as stream:
            first = await stream.receive()
            assert json.loads(first.wire)["action"] == "token"
            assert reg.cancel_job(job_id) is True
            rest = await drain(stream)
    assert rest == ["[CANCELLED]"]
    assert reg.get(job_id).state is JobState.CANCELLED


async def test_cancel_queued_job(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    ran: list[str] = []

    async def executor(job_id: str, payload: Any) -> None:
        ran.append(job_id)

    job_id = reg.create_job()
    assert reg.cancel_job(job_id) is True
    assert reg.get(job_id).state is JobState.CANCELLED
    async with open_job_runner(reg, executor):
        other = reg.create_job()
        await reg.wait(other)
    assert ran == [other]
    assert await collect(reg, job_id) == ["[CANCELLED]"]
    assert reg.get(job_id).started_at is None


async def test_cannot_cancel_completed_job(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 1})
        await reg.wait(job_id)
        assert reg.cancel_job(job_id) is False
    assert reg.get(job_id).state is JobState.COMPLETED
    assert (await collect(reg, job_id))[-1] == "[DONE]"


async def test_cannot_cancel_failed_job(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 1, "raise": "bad"})
        await reg.wait(job_id)
        assert reg.cancel_job(job_id) is False
    assert reg.get(job_id).state is JobState.FAILED


async def test_cancel_nonexistent_job(autojump_clock: MockClock) -> None:
    assert JobRegistry().cancel_job("job-nope") is False


async def test_timeout_with_no_receiver(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 0, "hang": True}, timeout=1.5)
        record = await reg.wait(job_id)
    assert record.state is JobState.FAILED
    assert record.error == "Job timed out after 1.5s"


async def test_cancellation_with_no_receiver(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 0, "hang": True})
        await trio.testing.wait_all_tasks_blocked()
        assert reg.get(job_id).state is JobState.RUNNING
        assert reg.cancel_job(job_id)
        record = await reg.wait(job_id)
    assert record.state is JobState.CANCELLED


async def test_multiple_tokens_then_timeout(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 5, "sleep": 0.5, "hang": True}, timeout=10)
        lines = await collect(reg, job_id)
    assert [json.loads(x)["n"] for x in lines[:-1]] == [0, 1, 2, 3, 4]
    assert lines[-1] == "[ERROR] Job timed out after 10s"


async def test_running_job_is_cancellable_until_it_ends(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 1, "hang": True})
        await trio.testing.wait_all_tasks_blocked()
        assert reg.get(job_id).state is JobState.RUNNING
        assert reg.cancel_job(job_id) is True
        assert reg.cancel_job(job_id) is False  # a second cancel decides nothing
        await reg.wait(job_id)


async def test_unknown_job_lookups_raise(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    with pytest.raises(JobNotFound):
        reg.get("job-unknown")
    with pytest.raises(JobNotFound):
        async with reg.subscribe("job-unknown"):
            pass  # pragma: no cover
    assert isinstance(JobNotFound("x"), trio_jobs.TrioJobsError)


# ---- done-signal semantics --------------------------------------------------------------


async def test_tokens_then_done(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 3})
        async with reg.subscribe(job_id) as stream:
            items = [item async for item in stream]
    assert [json.loads(i.wire)["human"] for i in items[:-1]] == ["token 0", "token 1", "token 2"]
    assert assert_one_signal_last(items).wire == "[DONE]"
    assert [i.id for i in items] == [1, 2, 3, 4]


async def test_executor_error_is_error_signal(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 2, "raise": "disk on fire"})
        lines = await collect(reg, job_id)
    assert lines[-1] == "[ERROR] disk on fire"
    assert reg.get(job_id).error == "disk on fire"


async def test_error_without_message_names_the_type(autojump_clock: MockClock) -> None:
    async def executor(job_id: str, payload: Any) -> None:
        raise KeyError

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        lines = await collect(reg, reg.create_job())
    assert lines == ["[ERROR] KeyError"]


async def test_narration_never_equals_a_signal(autojump_clock: MockClock) -> None:
    async def executor(job_id: str, payload: Any) -> None:
        narrate("done", "[DONE]")
        narrate("[DONE]", "[ERROR] fake")
        raise RuntimeError("real")

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        lines = await collect(reg, reg.create_job())
    assert len(lines) == 3
    for line in lines[:2]:
        assert trio_jobs.Signal.parse(line) is None
        assert json.loads(line)["human"] in ("[DONE]", "[ERROR] fake")
    assert lines[2] == "[ERROR] real"


async def test_children_narrating_after_main_body_delay_the_signal(
    autojump_clock: MockClock,
) -> None:
    async def child() -> None:
        for i in range(3):
            await trio.sleep(1)
            narrate("child", f"late {i}")

    async def executor(job_id: str, payload: Any) -> None:
        trio_jobs.job_nursery().start_soon(child)
        narrate("main", "main body done")

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        start = trio.current_time()
        job_id = reg.create_job()
        lines = await collect(reg, job_id)
        assert trio.current_time() - start == pytest.approx(3)
    assert [json.loads(x)["human"] for x in lines[:-1]] == [
        "main body done",
        "late 0",
        "late 1",
        "late 2",
    ]
    assert lines[-1] == "[DONE]"


async def test_child_tasks_inherit_the_job_and_are_cancelled_with_it(
    autojump_clock: MockClock,
) -> None:
    seen: list[str | None] = []
    finished: list[str] = []

    async def child() -> None:
        seen.append(trio_jobs.current_job_id())
        try:
            await trio.sleep_forever()
        finally:
            finished.append("child")

    async def executor(job_id: str, payload: Any) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            trio_jobs.job_nursery().start_soon(child)

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        job_id = reg.create_job()
        await trio.testing.wait_all_tasks_blocked()
        reg.cancel_job(job_id)
        assert await collect(reg, job_id) == ["[CANCELLED]"]
    assert seen == [job_id, job_id]
    assert finished == ["child", "child"]


async def test_cancel_racing_completion_gives_one_consistent_signal(
    autojump_clock: MockClock,
) -> None:
    """Cancels issued tick by tick around the moment the executor returns: before it the
    cancel wins, after it the job completed; never two signals, never a disagreement."""
    outcomes = set()
    for delay_ticks in range(40):

        async def executor(job_id: str, payload: Any) -> None:
            for _ in range(5):
                await trio.lowlevel.checkpoint()

        reg = JobRegistry()
        async with open_job_runner(reg, executor):
            job_id = reg.create_job()
            async with reg.subscribe(job_id) as stream:
                for _ in range(delay_ticks):
                    await trio.lowlevel.checkpoint()
                cancelled = reg.cancel_job(job_id)
                items = [i async for i in stream]
        signal = assert_one_signal_last(items)
        state = reg.get(job_id).state
        if cancelled:
            assert signal.wire == "[CANCELLED]"
            assert state is JobState.CANCELLED
        else:
            assert signal.wire == "[DONE]"
            assert state is JobState.COMPLETED
        outcomes.add(cancelled)
    assert outcomes == {True, False}  # both sides of the race were exercised


async def test_shielded_executor_finishes_its_work_then_reports_cancelled(
    autojump_clock: MockClock,
) -> None:
    """Cancel is delivered but a shield defers it; the registry keeps serving meanwhile."""

    async def executor(job_id: str, payload: Any) -> None:
        if payload == "shielded":
            with trio.CancelScope(shield=True):
                await trio.sleep(5)
                narrate("shielded", "finished shielded work")
        else:
            narrate("quick", "quick job")

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        slow = reg.create_job("shielded")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert reg.cancel_job(slow) is True
        quick = reg.create_job("quick")
        assert (await collect(reg, quick))[-1] == "[DONE]"
        assert trio.current_time() == start  # other jobs are not held up
        assert reg.get(slow).state is JobState.RUNNING
        lines = await collect(reg, slow)
        assert trio.current_time() - start == pytest.approx(5)
    assert lines == [lines[0], "[CANCELLED]"]
    assert reg.get(slow).state is JobState.CANCELLED


async def test_keyboard_interrupt_is_not_an_error_signal(autojump_clock: MockClock) -> None:
    async def executor(job_id: str, payload: Any) -> None:
        narrate("start", "about to be interrupted")
        raise KeyboardInterrupt

    reg = JobRegistry()
    job_id = reg.create_job()
    with pytest.RaisesGroup(KeyboardInterrupt, flatten_subgroups=True):
        async with open_job_runner(reg, executor):
            await reg.wait(job_id)
    record = reg.get(job_id)
    assert record.state is JobState.CANCELLED
    lines = await collect(reg, job_id)
    assert lines[-1] == "[CANCELLED]"
    assert not any(line.startswith("[ERROR]") for line in lines)


async def test_leaving_the_runner_cancels_running_jobs_and_keeps_queued(
    autojump_clock: MockClock,
) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking, max_concurrent=1):
        running = reg.create_job({"n": 1, "hang": True})
        queued = reg.create_job({"n": 1})
        await trio.testing.wait_all_tasks_blocked()
    assert reg.get(running).state is JobState.CANCELLED
    assert reg.history(running)[-1].reason == "runner stopped"
    assert reg.get(queued).state is JobState.QUEUED
    async with open_job_runner(reg, ticking):
        assert (await reg.wait(queued)).state is JobState.COMPLETED


# ---- scheduling ---------------------------------------------------------------------------


async def test_priority_then_fifo(autojump_clock: MockClock) -> None:
    order: list[str] = []

    async def executor(job_id: str, payload: Any) -> None:
        order.append(payload)
        await trio.sleep(1)

    reg = JobRegistry()
    ids = [
        reg.create_job("low-1", priority="low"),
        reg.create_job("normal-1"),
        reg.create_job("critical-1", priority=Priority.CRITICAL),
        reg.create_job("high-1", priority="high"),
        reg.create_job("normal-2", priority=1),
        reg.create_job("critical-2", priority="critical"),
        reg.create_job("low-2", priority="low"),
    ]
    async with open_job_runner(reg, executor, max_concurrent=1):
        for job_id in ids:
            await reg.wait(job_id)
    assert order == ["critical-1", "critical-2", "high-1", "normal-1", "normal-2", "low-1", "low-2"]


async def test_concurrency_limit_is_respected(autojump_clock: MockClock) -> None:
    active = 0
    peak = 0

    async def executor(job_id: str, payload: Any) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await trio.sleep(1)
        active -= 1

    reg = JobRegistry()
    async with open_job_runner(reg, executor, max_concurrent=3):
        start = trio.current_time()
        ids = [reg.create_job() for _ in range(10)]
        for job_id in ids:
            await reg.wait(job_id)
        assert trio.current_time() - start == pytest.approx(4)
    assert peak == 3


async def test_a_job_queued_while_a_runner_waits_starts_a_trip_later(
    autojump_clock: MockClock,
) -> None:
    # The waiting runner is handed the job as it is queued: the job's task runs its
    # first step in the very next scheduler batch (not after the runner woke up first).
    started: list[str] = []

    async def executor(job_id: str, payload: Any) -> None:
        started.append(job_id)
        await trio.sleep(1)

    reg = JobRegistry()
    async with open_job_runner(reg, executor, max_concurrent=2):
        await trio.testing.wait_all_tasks_blocked()
        job_id = reg.create_job()
        assert reg.get(job_id).state is JobState.QUEUED  # until its task runs
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert started == [job_id]
        assert reg.get(job_id).state is JobState.RUNNING
        # The runner waits again with its second slot; the third job waits for a slot.
        second, third = reg.create_job(), reg.create_job()
        await trio.testing.wait_all_tasks_blocked()
        assert started == [job_id, second]
        assert reg.get(third).state is JobState.QUEUED
        assert (await reg.wait(third)).state is JobState.COMPLETED
        assert trio.current_time() == pytest.approx(2)


async def test_a_higher_priority_job_queued_with_a_handed_one_still_goes_first(
    autojump_clock: MockClock,
) -> None:
    order: list[str] = []

    async def executor(job_id: str, payload: Any) -> None:
        order.append(payload)
        await trio.sleep(1)

    reg = JobRegistry()
    async with open_job_runner(reg, executor, max_concurrent=1):
        await trio.testing.wait_all_tasks_blocked()
        ids = [
            reg.create_job("low", priority="low"),  # handed to the waiting runner
            reg.create_job("normal"),
            reg.create_job("critical", priority="critical"),
        ]
        for job_id in ids:
            await reg.wait(job_id)
    assert order == ["critical", "normal", "low"]


_SUBMITTER: contextvars.ContextVar[str] = contextvars.ContextVar("submitter", default="runner")


async def test_a_handed_job_runs_in_its_runners_context_not_its_submitters(
    autojump_clock: MockClock,
) -> None:
    seen: list[str] = []

    async def executor(job_id: str, payload: Any) -> None:
        seen.append(_SUBMITTER.get())
        await trio.lowlevel.checkpoint()

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        await trio.testing.wait_all_tasks_blocked()
        _SUBMITTER.set("an HTTP request")
        await reg.wait(reg.create_job())
    assert seen == ["runner"]


async def test_a_handed_job_cancelled_before_it_starts_never_runs(
    autojump_clock: MockClock,
) -> None:
    ran: list[Any] = []

    async def executor(job_id: str, payload: Any) -> None:
        ran.append(payload)
        await trio.sleep(1)

    reg = JobRegistry()
    async with open_job_runner(reg, executor, max_concurrent=1):
        await trio.testing.wait_all_tasks_blocked()
        cancelled = reg.create_job("cancelled")
        assert reg.cancel_job(cancelled)
        after = reg.create_job("after")  # the slot came back: it runs
        assert (await reg.wait(after)).state is JobState.COMPLETED
    assert reg.get(cancelled).state is JobState.CANCELLED
    assert ran == ["after"]


async def test_a_job_handed_as_the_runner_stops_stays_queued(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        await trio.testing.wait_all_tasks_blocked()
        job_id = reg.create_job({"n": 1})
    assert reg.get(job_id).state is JobState.QUEUED
    assert len(reg.history(job_id)) == 1
    async with open_job_runner(reg, ticking):
        assert (await reg.wait(job_id)).state is JobState.COMPLETED


async def test_queue_deadline_fails_a_job_that_waited_too_long(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking, max_concurrent=1):
        blocker = reg.create_job({"n": 0, "sleep": 0, "hang": True}, timeout=10)
        waiting = reg.create_job({"n": 1}, expires=3)
        record = await reg.wait(waiting)
        assert trio.current_time() == pytest.approx(3)
        assert record.state is JobState.FAILED
        assert record.started_at is None
        await reg.wait(blocker)


async def test_bad_options_raise_and_create_nothing(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    for kwargs in (
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": math.inf},
        {"priority": "urgent"},
        {"tags": {"a": 1}},
        {"expires": 0},
    ):
        with pytest.raises(ValueError):
            reg.create_job(**kwargs)  # type: ignore[arg-type]
    assert len(reg) == 0


# ---- subscribers ----------------------------------------------------------------------------


async def test_several_subscribers_and_a_late_one_see_everything(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 5, "sleep": 1})
        results: list[list[str]] = []

        async def follow(delay: float) -> None:
            await trio.sleep(delay)
            results.append(await collect(reg, job_id))

        async with trio.open_nursery() as nursery:
            for delay in (0, 0, 2.5, 10):
                nursery.start_soon(follow, delay)
    assert len(results) == 4
    assert all(r == results[0] for r in results)
    assert len(results[0]) == 6


async def test_subscribe_after_an_event_id_resumes_without_gap_or_duplicate(
    autojump_clock: MockClock,
) -> None:
    reg = JobRegistry()
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 6})
        full = await collect(reg, job_id)
        resumed = await collect(reg, job_id, after=3)
    assert resumed == full[3:]


async def test_bounded_event_log_keeps_the_newest_events(autojump_clock: MockClock) -> None:
    reg = JobRegistry(event_log_size=4)
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 10, "sleep": 0})
        await reg.wait(job_id)
    lines = await collect(reg, job_id)
    assert [json.loads(x)["n"] for x in lines[:-1]] == [6, 7, 8, 9]
    assert lines[-1] == "[DONE]"


async def test_narrate_outside_a_job_logs_and_does_not_fail(
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="trio_jobs.narration"):
        narrate("orphan", "nobody is listening", x=1)
    assert "nobody is listening" in caplog.text
    assert trio_jobs.current_job_id() is None


async def test_narration_after_the_job_ended_goes_to_the_log(
    autojump_clock: MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    escaped: list[Any] = []

    async def executor(job_id: str, payload: Any) -> None:
        narrate("a", "inside")
        escaped.append(trio.lowlevel.current_task().context)

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        job_id = reg.create_job()
        await reg.wait(job_id)
    with caplog.at_level(logging.INFO, logger="trio_jobs.narration"):
        escaped[0].run(narrate, "b", "too late")
    assert "too late" in caplog.text
    assert len(await collect(reg, job_id)) == 2


async def test_events_carry_the_spec_fields(autojump_clock: MockClock) -> None:
    reg = JobRegistry(actor="hive")

    async def executor(job_id: str, payload: Any) -> None:
        narrate("download", "10 of 20", progress={"done": 10, "total": 20, "unit": "bytes"})
        narrate("say", "as someone else", actor="worker")

    async with open_job_runner(reg, executor):
        job_id = reg.create_job()
        lines = await collect(reg, job_id)
    first, second = (json.loads(x) for x in lines[:2])
    assert set(first) == {"id", "job_id", "ts", "actor", "action", "human", "progress"}
    assert first["job_id"] == job_id and first["actor"] == "hive" and first["id"] == 1
    assert first["ts"].endswith("Z")
    assert second["actor"] == "worker"


async def test_thousand_concurrent_jobs_do_not_mix(autojump_clock: MockClock) -> None:
    async def executor(job_id: str, payload: Any) -> None:
        for i in range(5):
            narrate("step", f"{payload}:{i}", owner=payload)
            await trio.sleep(0.01 * (payload % 7))

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        ids = {reg.create_job(n): n for n in range(1000)}
        results: dict[str, list[str]] = {}

        async def follow(job_id: str) -> None:
            results[job_id] = await collect(reg, job_id)

        async with trio.open_nursery() as nursery:
            for job_id in ids:
                nursery.start_soon(follow, job_id)
    for job_id, n in ids.items():
        lines = results[job_id]
        assert lines[-1] == "[DONE]"
        events = [json.loads(x) for x in lines[:-1]]
        assert [e["human"] for e in events] == [f"{n}:{i}" for i in range(5)]
        assert {e["job_id"] for e in events} == {job_id}


# ---- execute_and_stream ----------------------------------------------------------------------


async def test_execute_and_stream_lines(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with trio_jobs.execute_and_stream(reg, ticking, {"n": 2}) as lines:
        got = [line async for line in lines]
    assert got[-1] == "[DONE]" and len(got) == 3
    async with trio_jobs.execute_and_stream(reg, ticking, {"hang": True}, timeout=3) as lines:
        got = [line async for line in lines]
    assert got[-1] == "[ERROR] Job timed out after 3s"


async def test_execute_and_stream_left_early_cancels_the_job(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    async with trio_jobs.execute_and_stream(reg, ticking, {"n": 100}) as lines:
        await lines.receive()
        job_id = lines.job_id
    assert reg.get(job_id).state is JobState.CANCELLED
    assert (await collect(reg, job_id))[-1] == "[CANCELLED]"


async def test_execute_and_stream_does_not_go_through_a_runner_queue(
    autojump_clock: MockClock,
) -> None:
    reg = JobRegistry()
    ran: list[str] = []

    async def other(job_id: str, payload: Any) -> None:
        ran.append("runner")

    async with open_job_runner(reg, other):
        async with trio_jobs.execute_and_stream(reg, ticking, {"n": 1}) as lines:
            assert [x async for x in lines][-1] == "[DONE]"
    assert ran == []


# ---- retry -----------------------------------------------------------------------------------


async def test_retry_then_success_with_exact_backoff_times(autojump_clock: MockClock) -> None:
    attempts: list[float] = []

    async def flaky(job_id: str, payload: Any) -> None:
        attempts.append(trio.current_time())
        if len(attempts) < 3:
            raise ConnectionError(f"try {len(attempts)}")
        narrate("ok", "worked")

    reg = JobRegistry()
    policy = RetryPolicy(max_attempts=5, backoff_base=1, factor=2, cap=60)
    async with open_job_runner(reg, flaky):
        start = trio.current_time()
        job_id = reg.create_job(retry=policy)
        lines = await collect(reg, job_id)
    assert [t - start for t in attempts] == pytest.approx([0, 1, 3])
    assert lines[-1] == "[DONE]"
    retries = [json.loads(x) for x in lines[:-1] if json.loads(x)["action"] == "retry"]
    assert [r["attempt"] for r in retries] == [1, 2]
    record = reg.get(job_id)
    assert record.attempts == 3
    states = [t.state for t in reg.history(job_id)]
    assert states == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.RETRYING,
        JobState.RUNNING,
        JobState.RETRYING,
        JobState.RUNNING,
        JobState.COMPLETED,
    ]


async def test_retry_gives_up_after_max_attempts(autojump_clock: MockClock) -> None:
    async def broken(job_id: str, payload: Any) -> None:
        raise ValueError("still broken")

    reg = JobRegistry()
    async with open_job_runner(reg, broken):
        job_id = reg.create_job(retry=RetryPolicy(max_attempts=2, backoff_base=0.5))
        lines = await collect(reg, job_id)
    assert lines[-1] == "[ERROR] still broken"
    assert sum(1 for x in lines if x.startswith("{")) == 1
    assert reg.get(job_id).attempts == 2


async def test_cancel_during_backoff_ends_at_once(autojump_clock: MockClock) -> None:
    async def broken(job_id: str, payload: Any) -> None:
        raise ValueError("nope")

    reg = JobRegistry()
    async with open_job_runner(reg, broken):
        job_id = reg.create_job(retry=RetryPolicy(max_attempts=3, backoff_base=100))
        await trio.testing.wait_all_tasks_blocked()
        assert reg.get(job_id).state is JobState.RETRYING
        start = trio.current_time()
        assert reg.cancel_job(job_id)
        lines = await collect(reg, job_id)
        assert trio.current_time() == start
    assert lines[-1] == "[CANCELLED]"


async def test_timeouts_retry_only_when_asked(autojump_clock: MockClock) -> None:
    async def slow(job_id: str, payload: Any) -> None:
        await trio.sleep(10)

    reg = JobRegistry()
    async with open_job_runner(reg, slow):
        no = reg.create_job(timeout=1, retry=RetryPolicy(max_attempts=3, backoff_base=0))
        yes = reg.create_job(
            timeout=1, retry=RetryPolicy(max_attempts=3, backoff_base=0, retry_timeouts=True)
        )
        assert (await reg.wait(no)).attempts == 1
        assert (await reg.wait(yes)).attempts == 3
    assert reg.get(yes).error == "Job timed out after 1s"


async def test_retry_on_filters_exception_types(autojump_clock: MockClock) -> None:
    async def broken(job_id: str, payload: Any) -> None:
        raise KeyError("x")

    reg = JobRegistry()
    async with open_job_runner(reg, broken):
        job_id = reg.create_job(retry=RetryPolicy(max_attempts=3, retry_on=(ConnectionError,)))
        assert (await reg.wait(job_id)).attempts == 1


# ---- listing and retention ---------------------------------------------------------------


async def test_list_jobs_by_state_and_tag(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    a = reg.create_job(tags={"team": "a", "kind": "x"})
    b = reg.create_job(tags={"team": "b"})
    reg.cancel_job(b)
    assert [r.id for r in reg.list_jobs()] == [a, b]
    assert [r.id for r in reg.list_jobs(state="cancelled")] == [b]
    assert [r.id for r in reg.list_jobs(state=JobState.QUEUED, tag="team:a")] == [a]
    assert reg.list_jobs(tag="team:c") == []
    with pytest.raises(ValueError):
        reg.list_jobs(tag="no-colon")


async def test_finished_jobs_leave_memory_after_retention(autojump_clock: MockClock) -> None:
    reg = JobRegistry(retention=60)
    async with open_job_runner(reg, ticking):
        job_id = reg.create_job({"n": 1})
        await reg.wait(job_id)
        await trio.sleep(59)
        assert reg.get(job_id).state is JobState.COMPLETED
        await trio.sleep(2)
        with pytest.raises(JobNotFound):
            reg.get(job_id)


async def test_signal_objects_parse_back(autojump_clock: MockClock) -> None:
    for wire in ("[DONE]", "[CANCELLED]", "[ERROR] x y"):
        parsed = trio_jobs.Signal.parse(wire)
        assert isinstance(parsed, TerminalSignal)
        assert parsed.wire == wire
    assert trio_jobs.Signal.parse('{"human": "[DONE]"}') is None
    assert trio_jobs.DONE == "[DONE]"
