"""Retention: finished jobs leave memory, and memory returns to its baseline."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from trio_jobs import JobNotFound, JobRegistry, narrate, open_job_runner


def rss_bytes() -> int:
    """Resident memory after returning freed heap pages to the OS (glibc malloc_trim)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def small_job(job_id: str, payload: Any) -> None:
    narrate("work", "one event", n=payload)


async def run_batch(reg: JobRegistry, count: int, batch: int = 5000) -> None:
    for start in range(0, count, batch):
        ids = [reg.create_job(i) for i in range(start, min(count, start + batch))]
        await reg.wait(ids[-1])
        await trio.testing.wait_all_tasks_blocked()


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
async def test_memory_after_100k_finished_jobs_returns_to_baseline(
    autojump_clock: MockClock,
) -> None:
    reg = JobRegistry(retention=5)
    async with open_job_runner(reg, small_job):
        # Warm allocator caches and lazily built structures, then take the baseline.
        await run_batch(reg, 5000)
        await trio.sleep(10)
        assert len(reg) == 0
        baseline = rss_bytes()
        baseline_blocks = sys.getallocatedblocks()
        await run_batch(reg, 100_000)
        peak_jobs = len(reg)
        peak = rss_bytes()
        await trio.sleep(10)
        reg.create_job(0)  # creating a job also purges what expired
        await trio.testing.wait_all_tasks_blocked()
        after = rss_bytes()
        after_blocks = sys.getallocatedblocks()
    assert peak_jobs == 100_000
    assert len(reg) == 1
    assert peak > baseline + 50 * 1024 * 1024  # the 100k jobs really were in memory
    # Every Python object of the 100k jobs is gone: live blocks are back within 10 %.
    assert after_blocks <= baseline_blocks * 1.10, (baseline_blocks, after_blocks)
    # The process gives back at least 90 % of what the jobs took. What stays is pymalloc
    # arenas kept by a few survivors (allocator fragmentation), not trio-jobs data.
    assert after - baseline <= 0.10 * (peak - baseline), (baseline, peak, after)


async def test_retention_none_keeps_jobs(autojump_clock: MockClock) -> None:
    reg = JobRegistry(retention=None)
    async with open_job_runner(reg, small_job):
        job_id = reg.create_job(1)
        await reg.wait(job_id)
        await trio.sleep(10**6)
    assert reg.get(job_id).id == job_id


async def test_retention_zero_drops_at_once(autojump_clock: MockClock) -> None:
    reg = JobRegistry(retention=0)
    async with open_job_runner(reg, small_job):
        job_id = reg.create_job(1)
        async with reg.subscribe(job_id) as stream:
            lines = [item.wire async for item in stream]
        await trio.sleep(0.001)
        with pytest.raises(JobNotFound):
            reg.get(job_id)
    assert lines[-1] == "[DONE]"
