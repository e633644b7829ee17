"""The core library alone: run jobs, narrate progress, follow their streams.

Three jobs show the three endings: one completes (``[DONE]``), one runs past its timeout
(``[ERROR] Job timed out after 0.2s``) and one is cancelled (``[CANCELLED]``).

Run: ``python examples/basic_job.py``
"""

from __future__ import annotations

from typing import Any

import trio

import trio_jobs


async def count(job_id: str, payload: Any) -> None:
    """Narrate ``n`` steps, ``delay`` seconds apart, with a progress field."""
    n, delay = payload["n"], payload["delay"]
    for i in range(1, n + 1):
        await trio.sleep(delay)
        trio_jobs.narrate("step", f"step {i} of {n}", progress={"done": i, "total": n})


async def follow(registry: trio_jobs.JobRegistry, job_id: str) -> str:
    """Print a job's events and return its terminal line."""
    async with registry.subscribe(job_id) as stream:
        async for item in stream:
            print(f"  {item.wire}")
            if isinstance(item, trio_jobs.TerminalSignal):
                return item.wire
    raise AssertionError("a stream always ends with a signal")


async def main() -> None:
    registry = trio_jobs.JobRegistry(actor="example")
    async with trio_jobs.open_job_runner(registry, count, max_concurrent=4):
        print("a job that completes:")
        done = registry.create_job({"n": 3, "delay": 0.01}, timeout=5)
        assert await follow(registry, done) == "[DONE]"

        print("a job that times out:")
        slow = registry.create_job({"n": 100, "delay": 0.05}, timeout=0.2)
        assert await follow(registry, slow) == "[ERROR] Job timed out after 0.2s"

        print("a job that is cancelled:")
        doomed = registry.create_job({"n": 100, "delay": 0.05})
        async with trio.open_nursery() as nursery:

            async def cancel_soon() -> None:
                await trio.sleep(0.12)
                registry.cancel_job(doomed, "changed my mind")

            nursery.start_soon(cancel_soon)
            assert await follow(registry, doomed) == "[CANCELLED]"
        for job_id in (done, slow, doomed):
            record = registry.get(job_id)
            print(f"{job_id}: {record.state.value} {record.error or ''}")


if __name__ == "__main__":
    trio.run(main)
