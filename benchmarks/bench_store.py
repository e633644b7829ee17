"""Job stores: jobs/s and events/s with each store, as ratios to the plain in-memory
registry measured in the same run.

- jobs/s: create N jobs that each narrate 10 events, run them, wait until every job has
  ended and (with a store) until everything is written: the clock stops after the final
  flush, so a store cannot look fast by leaving work behind.
- events/s: jobs narrating many events each (yielding to the scheduler every 100) while
  a subscriber drains every stream in batches; again until the store has every event.

PostgreSQL is measured when ``TRIO_JOBS_PG_DSN`` is set or the server binaries are
installed (a throw-away cluster is started, as in the tests). Targets (issue 5): SQLite
>= 0.5x and PostgreSQL >= 0.3x of the in-memory jobs/s.

Run: ``python -m benchmarks.bench_store [--jobs N] [--events N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from trio_jobs import JobRegistry, narrate, open_job_runner
from trio_jobs._run import open_registry
from trio_jobs._stores import JobStore, MemoryStore, PostgresStore, SQLiteStore

StoreMaker = Callable[[], JobStore | None]


async def ten_events(job_id: str, payload: Any) -> None:
    for i in range(10):
        narrate("step", "working", i=i)
    await trio.lowlevel.checkpoint()


async def many_events(job_id: str, payload: Any) -> None:
    n = payload["n"]
    for i in range(n):
        narrate("token", "t", i=i)
        if i % 100 == 99:
            await trio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def registry_for(store: JobStore | None) -> AsyncIterator[JobRegistry]:
    async with open_registry(store, retention=None, event_log_size=10_000) as reg:
        yield reg


async def jobs_per_second(make: StoreMaker, n: int) -> float:
    start = time.perf_counter()
    async with registry_for(make()) as reg, open_job_runner(reg, ten_events):
        ids = [reg.create_job({"i": i}) for i in range(n)]
        for job_id in ids:
            await reg.wait(job_id)
    return n / (time.perf_counter() - start)


async def events_per_second(make: StoreMaker, n: int, jobs: int = 4) -> float:
    per_job = n // jobs
    seen = 0

    async def follow(reg: JobRegistry, job_id: str) -> None:
        nonlocal seen
        stream = reg.open_stream(job_id)
        while True:
            await stream.wait_ready()
            items = stream.receive_batch(4096)
            if not items:
                return
            seen += len(items)

    start = time.perf_counter()
    async with registry_for(make()) as reg, open_job_runner(reg, many_events):
        ids = [reg.create_job({"n": per_job}) for _ in range(jobs)]
        async with trio.open_nursery() as nursery:
            for job_id in ids:
                nursery.start_soon(follow, reg, job_id)
    elapsed = time.perf_counter() - start
    assert seen == per_job * jobs + jobs, seen
    return per_job * jobs / elapsed


def _pg_dsn() -> str | None:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests import pg
    except ImportError:
        return os.environ.get("TRIO_JOBS_PG_DSN")
    dsn, why = pg._dsn()
    if dsn is None:
        print(f"postgres: skipped ({why})")
    return dsn


async def _drop_schema(dsn: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    def drop() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    await trio.to_thread.run_sync(drop)


async def run(n_jobs: int, n_events: int, repeat: int) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="trio-jobs-bench-"))
    counter = iter(range(1_000_000))
    dsn = _pg_dsn()
    schemas: list[str] = []

    def sqlite() -> JobStore:
        return SQLiteStore(tmp / f"bench{next(counter)}.db")

    def postgres() -> JobStore:
        assert dsn is not None
        schemas.append(f"bench_{os.getpid()}_{next(counter)}")
        return PostgresStore(dsn, schema=schemas[-1])

    kinds: dict[str, StoreMaker] = {
        "in-memory (no store)": lambda: None,
        "MemoryStore": MemoryStore,
        "SQLiteStore": sqlite,
    }
    if dsn is not None:
        kinds["PostgresStore"] = postgres
    # warm-up: imports, thread pool, first connections
    for make in kinds.values():
        await jobs_per_second(make, 200)
    # rounds interleave the stores, so a burst of load elsewhere on the machine hits them
    # alike; each figure is the best of its rounds
    results: dict[str, dict[str, float]] = {
        name: {"jobs/s": 0.0, "events/s": 0.0} for name in kinds
    }
    for _ in range(repeat):
        for name, make in kinds.items():
            r = results[name]
            r["jobs/s"] = max(r["jobs/s"], await jobs_per_second(make, n_jobs))
            r["events/s"] = max(r["events/s"], await events_per_second(make, n_events))
    for schema in schemas:
        assert dsn is not None
        await _drop_schema(dsn, schema)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return results


def report(results: dict[str, dict[str, float]]) -> str:
    base = results["in-memory (no store)"]
    lines = [f"{'store':<22}{'jobs/s':>10}{'ratio':>8}{'events/s':>12}{'ratio':>8}"]
    for name, r in results.items():
        lines.append(
            f"{name:<22}{r['jobs/s']:>10,.0f}{r['jobs/s'] / base['jobs/s']:>7.2f}x"
            f"{r['events/s']:>12,.0f}{r['events/s'] / base['events/s']:>7.2f}x"
        )
    targets = {"SQLiteStore": 0.5, "PostgresStore": 0.3}
    for name, target in targets.items():
        if name in results:
            ratio = results[name]["jobs/s"] / base["jobs/s"]
            verdict = "meets" if ratio >= target else "MISSES"
            lines.append(f"{name} jobs/s {ratio:.2f}x {verdict} the {target}x target")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per jobs/s run")
    parser.add_argument("--events", type=int, default=200_000, help="events per events/s run")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args(argv)
    results = trio.run(run, args.jobs, args.events, args.repeat)
    print(report(results))


if __name__ == "__main__":
    main()
