"""Every public async operation of the core is a checkpoint, even when it need not block."""

from __future__ import annotations

from typing import Any

from trio.testing import MockClock, assert_checkpoints

from trio_jobs import JobRegistry, execute_and_stream, narrate, open_job_runner, run_job


async def one_event(job_id: str, payload: Any) -> None:
    narrate("x", "y")


async def test_stream_operations_checkpoint_when_items_are_ready(
    autojump_clock: MockClock,
) -> None:
    reg = JobRegistry()
    job_id = reg.create_job(enqueue=False)
    await run_job(reg, job_id, one_event)
    stream = reg.open_stream(job_id)
    with assert_checkpoints():
        await stream.wait_ready()
    with assert_checkpoints():
        await stream.receive()  # the event
    with assert_checkpoints():
        await stream.receive()  # the signal
    with assert_checkpoints():
        await reg.wait(job_id)
    with assert_checkpoints():
        async with reg.subscribe(job_id):
            pass
    with assert_checkpoints():
        await stream.aclose()


async def test_run_job_on_a_finished_job_still_checkpoints(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    job_id = reg.create_job(enqueue=False)
    reg.cancel_job(job_id)
    with assert_checkpoints():
        await run_job(reg, job_id, one_event)


async def test_runner_and_one_call_helper_checkpoint(autojump_clock: MockClock) -> None:
    reg = JobRegistry()
    with assert_checkpoints():
        async with open_job_runner(reg, one_event):
            pass
    with assert_checkpoints():
        async with execute_and_stream(reg, one_event) as lines:
            assert [x async for x in lines][-1] == "[DONE]"
