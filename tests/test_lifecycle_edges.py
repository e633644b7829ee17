"""Edge cases of the lifecycle: executors that misbehave while being cancelled or timed
out, failing observers, narration from worker threads, closing a stream under a reader."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from trio_jobs import (
    JobRegistry,
    JobState,
    RetryPolicy,
    job_nursery,
    narrate,
    open_job_runner,
)
from trio_jobs._job import Job

from .helpers import collect


async def test_an_error_raised_while_cancelling_stays_in_its_job(
    autojump_clock: MockClock,
) -> None:
    """A child raising during the cancel must not break the runner or other jobs."""

    async def fragile_child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise ValueError("cleanup failed")

    async def executor(job_id: str, payload: Any) -> None:
        if payload == "fragile":
            job_nursery().start_soon(fragile_child)
        await trio.sleep(10)

    reg = JobRegistry()
    async with open_job_runner(reg, executor):
        fragile = reg.create_job("fragile")
        innocent = reg.create_job("innocent")
        await trio.sleep(1)
        assert reg.cancel_job(fragile)
        assert await collect(reg, fragile) == ["[CANCELLED]"]
        assert (await reg.wait(innocent)).state is JobState.COMPLETED
        assert trio.current_time() == pytest.approx(10)


@pytest.mark.parametrize("behaviour", ["absorbs", "converts", "child"])
async def test_a_timeout_is_a_timeout_whatever_the_executor_makes_of_it(
    autojump_clock: MockClock, behaviour: str
) -> None:
    async def child() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("child cleanup failed")

    async def executor(job_id: str, payload: Any) -> None:
        if behaviour == "child":
            job_nursery().start_soon(child)
        try:
            await trio.sleep(100)
        except trio.Cancelled:
            if behaviour == "absorbs":
                return
            if behaviour == "converts":
                raise RuntimeError("cleanup failed") from None
            raise

    reg = JobRegistry()
    policy = RetryPolicy(max_attempts=3, backoff_base=0, retry_timeouts=True)
    async with open_job_runner(reg, executor):
        job_id = reg.create_job(timeout=1, retry=policy)
        record = await reg.wait(job_id)
    assert record.state is JobState.FAILED
    assert record.error == "Job timed out after 1s"
    assert record.attempts == 3


async def test_a_cancel_is_never_retried(autojump_clock: MockClock) -> None:
    async def converts(job_id: str, payload: Any) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            raise ConnectionError("lost") from None

    reg = JobRegistry()
    async with open_job_runner(reg, converts):
        job_id = reg.create_job(retry=RetryPolicy(max_attempts=5, backoff_base=1))
        await trio.testing.wait_all_tasks_blocked()
        reg.cancel_job(job_id, "user asked")
        lines = await collect(reg, job_id)
    assert lines == ["[CANCELLED]"]
    assert [t.state for t in reg.history(job_id)] == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.CANCELLED,
    ]
    assert reg.history(job_id)[-1].reason == "user asked"


async def test_a_failing_observer_cannot_leave_a_stream_open(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(job: Job, transition: Any) -> None:
        if transition.state is JobState.COMPLETED:
            raise RuntimeError("metrics backend down")

    reg = JobRegistry()
    reg.add_observer(broken)

    async def executor(job_id: str, payload: Any) -> None:
        narrate("x", "y")

    with caplog.at_level(logging.ERROR, logger="trio_jobs.registry"):
        async with open_job_runner(reg, executor):
            first = reg.create_job()
            assert (await collect(reg, first))[-1] == "[DONE]"
            second = reg.create_job()
            assert (await collect(reg, second))[-1] == "[DONE]"
    assert "metrics backend down" in caplog.text


async def test_narrate_from_a_worker_thread_reaches_the_stream() -> None:
    def blocking_download() -> None:
        for i in range(3):
            narrate("download", f"chunk {i}", progress={"done": i + 1, "total": 3})

    async def executor(job_id: str, payload: Any) -> None:
        await trio.to_thread.run_sync(blocking_download)

    reg = JobRegistry()
    with trio.fail_after(10):
        async with open_job_runner(reg, executor):
            lines = await collect(reg, reg.create_job())
    assert len(lines) == 4
    assert lines[-1] == "[DONE]"
    assert '"human":"chunk 2"' in lines[2]


async def test_closing_a_stream_wakes_its_blocked_reader(autojump_clock: MockClock) -> None:
    async def hang(job_id: str, payload: Any) -> None:
        await trio.sleep_forever()

    reg = JobRegistry()
    async with open_job_runner(reg, hang):
        stream = reg.open_stream(reg.create_job())
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive()

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await stream.aclose()


async def test_a_cancelled_submission_without_a_store_leaves_no_queued_job() -> None:
    """A submitter cancelled inside ``submit`` (an HTTP client that went away mid-POST)
    never got the id: the job ends at once instead of staying QUEUED for ever."""
    registry = JobRegistry()
    with trio.CancelScope() as scope:
        scope.cancel()
        await registry.submit({"x": 1})
    (record,) = registry.list_jobs()
    assert record.state is JobState.FAILED
    assert record.error == "not acknowledged: the submission was cancelled"
