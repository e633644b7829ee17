"""Property: whatever an executor does and whenever it is cancelled, every stream ends with
exactly one signal, last, matching the job's final state; order is kept; no task outlives
its job. Random executors run under an autojump MockClock."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_jobs import JobRegistry, JobState, RetryPolicy, narrate, open_job_runner

from . import pg
from .helpers import assert_one_signal_last


@pytest.fixture(params=["no store", "memory", "sqlite", "postgres"])
def store_kind(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """Run the property on every store: each registry it makes is persisted to a new
    store of this kind (the nox ``tests_store`` sessions pick one for the whole suite)."""
    chosen = os.environ.get("TRIO_JOBS_TEST_STORE")
    if chosen:
        if request.param != chosen:
            pytest.skip(f"TRIO_JOBS_TEST_STORE={chosen}")
        return chosen
    if request.param != "no store":
        pg.persist_every_registry(request.param, monkeypatch, tmp_path)
    return str(request.param)


@dataclass(frozen=True)
class Step:
    kind: str  # narrate | sleep | raise | spawn | hang | checkpoint
    n: int = 0
    t: float = 0.0
    child: tuple[Step, ...] = ()


leaf_steps = st.one_of(
    st.builds(Step, kind=st.just("narrate"), n=st.integers(1, 5)),
    st.builds(Step, kind=st.just("sleep"), t=st.floats(0, 3)),
    st.builds(Step, kind=st.just("checkpoint")),
    st.builds(Step, kind=st.just("raise")),
    st.builds(Step, kind=st.just("hang")),
    st.builds(Step, kind=st.just("absorb")),
    st.builds(Step, kind=st.just("guarded_sleep"), t=st.floats(0, 3)),
)
child_programs = st.lists(leaf_steps, max_size=4).map(tuple)
steps = st.one_of(leaf_steps, st.builds(Step, kind=st.just("spawn"), child=child_programs))
programs = st.lists(steps, max_size=6).map(tuple)


class Tracker:
    def __init__(self) -> None:
        self.alive = 0
        self.seq = 0


async def run_program(program: tuple[Step, ...], name: str, tracker: Tracker) -> None:
    from trio_jobs import job_nursery

    tracker.alive += 1
    try:
        for index, step in enumerate(program):
            if step.kind == "narrate":
                for i in range(step.n):
                    tracker.seq += 1
                    narrate("say", f"{name}.{index}.{i}", task=name, seq=tracker.seq)
            elif step.kind == "sleep":
                await trio.sleep(step.t)
            elif step.kind == "checkpoint":
                await trio.lowlevel.checkpoint()
            elif step.kind == "raise":
                raise RuntimeError(f"boom in {name}")
            elif step.kind == "hang":
                await trio.sleep_forever()
            elif step.kind == "absorb":
                # An executor that swallows its cancellation (bad manners, but it happens).
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    return
            elif step.kind == "guarded_sleep":
                # Cleanup that raises, also while a cancel or timeout unwinds it.
                try:
                    await trio.sleep(step.t)
                finally:
                    raise RuntimeError(f"cleanup failed in {name}")
            elif step.kind == "spawn":
                job_nursery().start_soon(run_program, step.child, f"{name}/{index}", tracker)
    finally:
        tracker.alive -= 1


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    program=programs,
    cancel_at=st.one_of(st.none(), st.floats(0, 10)),
    timeout=st.one_of(st.none(), st.floats(0.5, 10)),
    retries=st.integers(1, 3),
    late_subscriber_at=st.floats(0, 12),
)
def test_every_stream_ends_with_one_honest_signal(
    store_kind: str,
    program: tuple[Step, ...],
    cancel_at: float | None,
    timeout: float | None,
    retries: int,
    late_subscriber_at: float,
) -> None:
    tracker = Tracker()
    alive_at_signal: list[int] = []
    outcome: dict[str, Any] = {}

    async def executor(job_id: str, payload: Any) -> None:
        await run_program(program, "main", tracker)

    async def main() -> None:
        reg = JobRegistry()
        policy = RetryPolicy(max_attempts=retries, backoff_base=0.5) if retries > 1 else None
        async with open_job_runner(reg, executor):
            job_id = reg.create_job(timeout=timeout, retry=policy)
            streams: list[list[Any]] = []

            async def follow(delay: float) -> None:
                await trio.sleep(delay)
                async with reg.subscribe(job_id) as stream:
                    items = []
                    async for item in stream:
                        if not item.wire.startswith("{"):
                            alive_at_signal.append(tracker.alive)
                        items.append(item)
                    streams.append(items)

            async def canceller() -> None:
                assert cancel_at is not None
                await trio.sleep(cancel_at)
                outcome["cancel_returned"] = reg.cancel_job(job_id)

            with trio.move_on_after(100) as cap:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(follow, 0)
                    nursery.start_soon(follow, late_subscriber_at)
                    if cancel_at is not None:
                        nursery.start_soon(canceller)
        outcome["capped"] = cap.cancelled_caught
        outcome["record"] = reg.get(job_id)
        outcome["streams"] = streams

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    record = outcome["record"]
    assert record.state.is_terminal
    if outcome["capped"]:
        # Only a job with nothing to end it runs until the test's 100 s cap.
        assert timeout is None
        assert not outcome.get("cancel_returned")
    assert tracker.alive == 0
    expected = {
        JobState.COMPLETED: "[DONE]",
        JobState.CANCELLED: "[CANCELLED]",
        JobState.FAILED: f"[ERROR] {record.error}",
    }[record.state]
    if outcome.get("cancel_returned"):
        assert record.state is JobState.CANCELLED
    streams = outcome["streams"]
    if not outcome["capped"]:
        # Followers are cut short only when the test's cap stops everything.
        assert len(streams) == 2
    for items in streams:
        signal = assert_one_signal_last(items)
        assert signal.wire == expected
        ids = [item.id for item in items]
        assert ids == list(range(1, len(ids) + 1))
        events = [json.loads(item.wire) for item in items[:-1]]
        seqs = [event["seq"] for event in events if event["action"] == "say"]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
    assert alive_at_signal == [0] * len(alive_at_signal)
    if len(streams) == 2:
        assert [i.wire for i in streams[0]] == [i.wire for i in streams[1]]
    if record.state is JobState.FAILED and record.error.startswith("Job timed out"):
        assert timeout is not None
