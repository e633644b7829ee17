"""In-process benchmarks of the job lifecycle (issue: core).

- narration path: narrate -> subscriber, against a raw trio memory channel doing blocking
  send/receive of str in the same run;
- jobs/s: create, run an executor narrating 10 events, a subscriber sees [DONE];
- cancel -> [CANCELLED] seen by a subscriber (median latency);
- memory: RSS per running idle job and per finished retained record.
"""

from __future__ import annotations

import gc
import math
from typing import Any

import trio
import trio.testing

from trio_jobs import JobRegistry, TerminalSignal, narrate, open_job_runner

from ._util import median, now, report, rss_bytes

EVENTS = 200_000
REPEATS = 3


async def raw_channel_rate(n: int) -> float:
    send, recv = trio.open_memory_channel[str](math.inf)
    start = now()

    async def producer() -> None:
        async with send:
            for _ in range(n):
                await send.send("x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        async with recv:
            async for _ in recv:
                pass
    return n / (now() - start)


async def narration_rate(n: int) -> float:
    reg = JobRegistry(event_log_size=1 << 16)

    async def executor(job_id: str, payload: Any) -> None:
        for i in range(n):
            narrate("token", "x")
            if i & 1023 == 0:
                await trio.lowlevel.checkpoint()

    count = 0
    start = now()
    async with open_job_runner(reg, executor):
        job_id = reg.create_job()
        async with reg.subscribe(job_id) as stream:
            while True:
                await stream.wait_ready()
                batch = stream.receive_batch(4096)
                count += len(batch)
                if batch and isinstance(batch[-1], TerminalSignal):
                    break
    elapsed = now() - start
    assert count == n + 1, count
    return n / elapsed


async def ten_events(job_id: str, payload: Any) -> None:
    for i in range(10):
        narrate("token", "tok", i=i)
    await trio.lowlevel.checkpoint()


async def jobs_per_second(total: int, clients: int) -> float:
    reg = JobRegistry(retention=1)
    done = 0

    async def client(count: int) -> None:
        nonlocal done
        for _ in range(count):
            job_id = reg.create_job()
            async with reg.subscribe(job_id) as stream:
                while True:
                    await stream.wait_ready()
                    batch = stream.receive_batch()
                    if batch and isinstance(batch[-1], TerminalSignal):
                        break
            assert batch[-1].wire == "[DONE]"
            done += 1

    start = now()
    async with open_job_runner(reg, ten_events), trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client, total // clients)
    return done / (now() - start)


async def cancel_latency(samples: int) -> list[float]:
    reg = JobRegistry(retention=1)

    async def hang(job_id: str, payload: Any) -> None:
        narrate("start", "waiting")
        await trio.sleep_forever()

    latencies = []
    async with open_job_runner(reg, hang):
        for _ in range(samples):
            job_id = reg.create_job()
            async with reg.subscribe(job_id) as stream:
                await stream.receive()
                await trio.testing.wait_all_tasks_blocked()
                start = now()
                reg.cancel_job(job_id)
                item = await stream.receive()
                latencies.append(now() - start)
                assert item.wire == "[CANCELLED]"
    return latencies


async def memory_per_running_job(n: int) -> float:
    reg = JobRegistry()

    async def idle(job_id: str, payload: Any) -> None:
        await trio.sleep_forever()

    gc.collect()
    async with open_job_runner(reg, idle):
        await trio.testing.wait_all_tasks_blocked()
        before = rss_bytes()
        for _ in range(n):
            reg.create_job()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = rss_bytes()
        assert reg.running == n
    return (after - before) / n


async def memory_per_finished_record(n: int) -> float:
    reg = JobRegistry(retention=None)

    async def nothing(job_id: str, payload: Any) -> None:
        pass

    async with open_job_runner(reg, nothing):
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        before = rss_bytes()
        for start in range(0, n, 5000):
            ids = [reg.create_job() for _ in range(min(5000, n - start))]
            await reg.wait(ids[-1])
            await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = rss_bytes()
    assert len(reg) == n
    return (after - before) / n


async def main_async() -> None:
    print("== core (in-process) ==", flush=True)
    raw = [await raw_channel_rate(EVENTS) for _ in range(REPEATS)]
    ours = [await narration_rate(EVENTS) for _ in range(REPEATS)]
    report(
        "narrate -> subscriber, events/s (best of 3)",
        f"{max(ours):,.0f}/s",
        max(ours) / max(raw),
        ">= 1.5x raw channel",
    )
    report("  baseline: raw trio channel send/receive", f"{max(raw):,.0f}/s")
    for clients in (1, 100):
        rates = [await jobs_per_second(20_000, clients) for _ in range(REPEATS)]
        report(
            f"jobs/s, 10 events each, {clients} subscriber task(s)",
            f"{max(rates):,.0f}/s",
            None,
            ">= 5,000",
        )
    lat = await cancel_latency(1000)
    lat.sort()
    report(
        "cancel -> [CANCELLED] at subscriber",
        f"p50 {median(lat) * 1e3:.3f} ms, p99 {lat[int(len(lat) * 0.99)] * 1e3:.3f} ms",
        None,
        "median <= 0.5 ms",
    )
    per_job = await memory_per_running_job(10_000)
    report("RSS per running idle job", f"{per_job / 1024:.2f} KB", None, "<= 8 KB")
    per_record = await memory_per_finished_record(100_000)
    report("RSS per finished retained record", f"{per_record / 1024:.2f} KB", None, "<= 2 KB")


def main() -> None:
    trio.run(main_async)


if __name__ == "__main__":
    main()
