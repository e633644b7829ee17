"""Running jobs: one nursery and one cancel scope per job, outcomes decided by scopes."""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._exceptions import JobNotFound
from ._job import Job
from ._models import JobState
from ._narration import _CURRENT, JobContext
from ._registry import JobRegistry
from ._signals import Signal, TerminalSignal, timeout_message

__all__ = ["Executor", "execute", "run_job", "run_queue", "sweep"]

Executor = Callable[[str, Any], Awaitable[None]]
"""``async def executor(job_id: str, payload: Any) -> None``: the work of one job."""


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_error_text(e) for e in exc.exceptions)
    text = str(exc)
    return text if text else type(exc).__name__


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _only_exceptions(exc: BaseException) -> bool:
    """True when ``exc`` holds ordinary errors only (no Cancelled, KeyboardInterrupt...)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_exceptions(e) for e in exc.exceptions)
    return isinstance(exc, Exception)


async def _attempt(job: Job, executor: Executor) -> tuple[BaseException | None, bool]:
    """Run the executor once in a fresh nursery; return (error, timed_out)."""
    if job.timeout is None:
        return await _attempt_in_nursery(job, executor), False
    error: BaseException | None = None
    try:
        with trio.move_on_after(job.timeout) as timeout_scope:
            error = await _attempt_in_nursery(job, executor)
    except Exception as exc:  # raised while the timeout unwound the attempt
        error = exc
    # The deadline decides, not how the executor reacted to it: an attempt that swallowed
    # its Cancelled or raised something else while unwinding still timed out.
    return error, timeout_scope.cancel_called


async def _attempt_in_nursery(job: Job, executor: Executor) -> BaseException | None:
    """The job's nursery: the executor's body plus every task it starts in the nursery."""
    assert job.sender is not None
    try:
        async with trio.open_nursery() as nursery:
            token = _CURRENT.set(
                JobContext(
                    job.id,
                    job.sender,
                    nursery,
                    trio.lowlevel.current_trio_token(),
                    threading.get_ident(),
                )
            )
            try:
                await executor(job.id, job.payload)
            finally:
                _CURRENT.reset(token)
    except BaseException as exc:
        if not _only_exceptions(exc):
            raise
        return exc
    return None


async def _attempts(registry: JobRegistry, job: Job, executor: Executor) -> TerminalSignal:
    """Run attempts until one succeeds or the retry policy gives up (the job's first
    attempt has begun)."""
    while True:
        if job.state is JobState.RETRYING:
            job.begin_attempt()
        if registry.backing is not None:
            await registry.backing.before_attempt(job)
        error, timed_out = await _attempt(job, executor)
        if job.cancel_requested:  # whatever the attempt made of it, the cancel decides
            return TerminalSignal(Signal.CANCELLED)
        if error is None and not timed_out:
            return TerminalSignal(Signal.DONE)
        assert job.timeout is not None or not timed_out
        if timed_out:
            message = timeout_message(job.timeout or 0)
        else:
            message = _error_text(error) if error is not None else "failed"
        policy = job.retry
        leaf = _first_leaf(error) if error is not None else None
        if policy is None or not policy.should_retry(job.attempts, leaf, timed_out=timed_out):
            return TerminalSignal(Signal.ERROR, message)
        delay = policy.delay(job.attempts)
        job.retry_later(message, delay)
        assert job.sender is not None
        job.sender.send_nowait(
            "retry",
            f"Attempt {job.attempts} failed ({message}); retrying in {delay:g}s",
            {
                "attempt": job.attempts,
                "max_attempts": policy.max_attempts,
                "delay_s": delay,
                "error": message,
            },
            time.time(),
        )
        await trio.sleep(delay)


async def run_job(registry: JobRegistry, job_id: str, executor: Executor) -> None:
    """Run one queued job to its end in the calling task (it is taken off the queue).

    Returns once the job has finished and its terminal signal is in its stream. If the
    surrounding scope is cancelled, the job ends CANCELLED and ``Cancelled`` propagates.
    """
    job = registry.job(job_id)
    if job is None:
        raise JobNotFound(job_id)
    await trio.lowlevel.checkpoint_if_cancelled()
    if job.state is not JobState.QUEUED:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return
    job.begin_attempt()
    await execute(registry, job, executor)


async def execute(registry: JobRegistry, job: Job, executor: Executor) -> None:
    """Run a job whose first attempt has begun (it is RUNNING) to its end."""
    job.scope = trio.CancelScope()
    await _execute(registry, job, executor)


async def _execute(registry: JobRegistry, job: Job, executor: Executor) -> None:
    """Run a job that is already RUNNING with its scope set; always finishes it."""
    scope = job.scope
    assert scope is not None
    outcome: TerminalSignal | None = None
    try:
        with scope:
            if not job.cancel_requested:
                outcome = await _attempts(registry, job, executor)
    except BaseException as exc:
        if _only_exceptions(exc):
            # Ordinary errors never leave the job, even when they were raised while a
            # cancel unwound it: other jobs and the runner are not theirs to break.
            if job.cancel_requested:
                job.finish(TerminalSignal(Signal.CANCELLED), job.cancel_reason or "cancelled")
            else:
                job.finish(TerminalSignal(Signal.ERROR, _error_text(exc)))
            return
        # Cancelled from outside the job (its runner is stopping), KeyboardInterrupt and
        # friends: the job ends CANCELLED and the exception goes on.
        job.finish(TerminalSignal(Signal.CANCELLED), _interrupt_reason(exc))
        raise
    if job.cancel_requested or outcome is None:
        job.finish(TerminalSignal(Signal.CANCELLED), job.cancel_reason or "cancelled")
    elif outcome.signal is Signal.DONE:
        job.finish(outcome, "completed")
    else:
        job.finish(outcome)


def _interrupt_reason(exc: BaseException) -> str:
    if isinstance(exc, trio.Cancelled) or (
        isinstance(exc, BaseExceptionGroup) and exc.split(trio.Cancelled)[1] is None
    ):
        return "runner stopped"
    return f"interrupted by {type(_first_leaf(exc)).__name__}"


async def _run_started(
    registry: JobRegistry, job: Job, executor: Executor, slots: trio.Semaphore | None
) -> None:
    try:
        await _execute(registry, job, executor)
    finally:
        if slots is not None:
            slots.release()


async def _run_handed(
    registry: JobRegistry, job: Job, executor: Executor, slots: trio.Semaphore | None
) -> None:
    """Run a job handed to a waiting runner as it was queued (still QUEUED): begin its
    attempt here, unless it ended meanwhile or the runner is stopping (it stays queued)."""
    try:
        if job.state is not JobState.QUEUED:  # cancelled (or refused) meanwhile
            return
        if trio.current_effective_deadline() == -math.inf:  # the runner is being cancelled
            registry.requeue(job)
            return
        job = registry.prefer_queued(job)
        job.begin_attempt()
        job.scope = trio.CancelScope()
        await _execute(registry, job, executor)
    finally:
        if slots is not None:
            slots.release()


async def run_queue(
    registry: JobRegistry,
    executor: Executor,
    *,
    max_concurrent: int | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the registry's queued jobs, now and later, until cancelled (see ``run_jobs``,
    which also persists a registry with a store)."""
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1 or None")
    slots = trio.Semaphore(max_concurrent) if max_concurrent is not None else None
    async with trio.open_nursery() as nursery:
        if not registry._sweeping:
            registry._sweeping = True
            nursery.start_soon(sweep, registry)
        task_status.started()

        # Called by whichever task queues the job: the job's task gets this runner's
        # context variables, not that task's.
        context = contextvars.copy_context()

        def hand(job: Job) -> None:
            # A job queued while this runner waits with a free slot: its task starts now
            # (and owns the slot), a scheduler trip before this runner could start it.
            context.run(nursery.start_soon, _run_handed, registry, job, executor, slots)

        while True:
            if slots is not None:
                await slots.acquire()
            try:
                job = await registry.next_job(hand)
            except BaseException:
                if slots is not None:
                    slots.release()
                raise
            if job is None:  # handed: its task holds the slot
                continue
            job.begin_attempt()
            job.scope = trio.CancelScope()
            nursery.start_soon(_run_started, registry, job, executor, slots)


async def sweep(registry: JobRegistry) -> None:
    """Run ``registry.sweep()`` (retention and queue deadlines), marked as running."""
    try:
        await registry.sweep()
    finally:
        registry._sweeping = False
