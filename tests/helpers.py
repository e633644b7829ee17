"""Small shared helpers for the core tests."""

from __future__ import annotations

from trio_jobs import JobRegistry, JobStream, NarrationEvent, TerminalSignal


async def drain(stream: JobStream) -> list[str]:
    """Every wire line of a stream up to its end."""
    return [item.wire async for item in stream]


async def collect(registry: JobRegistry, job_id: str, after: int | None = None) -> list[str]:
    async with registry.subscribe(job_id, after=after) as stream:
        return await drain(stream)


def assert_one_signal_last(items: list[NarrationEvent | TerminalSignal]) -> TerminalSignal:
    signals = [i for i in items if isinstance(i, TerminalSignal)]
    assert len(signals) == 1, items
    assert items[-1] is signals[0]
    return signals[0]
