"""Job stores with the durable acknowledgement (issue 9), as ratios to the registry
without a store measured in the same run. Every figure is the median of ``--repeat``
runs (3); rounds interleave the stores, so a burst of load elsewhere on the machine hits
them alike; a ratio is the median of a store over the median of its baseline.

1. jobs/s: 32 tasks each ``await registry.submit(...)`` in a loop for ``--seconds``
   (a trivial executor: the job runs and ends), then the clock stops once every job's
   end is visible (``await registry.wait(job_id)``: with a store, once it is stored).
   Baseline: no store. Targets: SQLite >= 0.5x, PostgreSQL >= 0.3x.
2. submit latency: p50 and p99 of ``await registry.submit(...)`` (wall clock), one
   submitter in a loop and 32 concurrent, jobs running meanwhile. Target: SQLite p99 <=
   10 ms.
3. narrate -> subscriber events/s: one job narrates ``--events`` events as fast as it
   can (a checkpoint every 100), one subscriber reads with ``wait_ready`` and
   ``receive_batch``; events/s counts the events the subscriber received, until its
   terminal signal. Baseline: no store. Target: SQLite >= 0.8x. Variants:

   - reservation (default ``headroom=256``): readers see ids the store has reserved;
   - ``headroom=0``: the persister still reserves ``2 x`` the ids gained since its
     last flush (the reservation grows with the rate), so this is not delivery once
     stored;
   - stored only: a benchmark-only Persister that gates readers at the last *stored*
     event id (the alternative design, "events delivered only once stored").

   Each is run with the default event log (10,000 events: what a subscriber that falls
   further behind misses is counted as ``skipped``) and with a log holding every event.

Every run starts with ``gc.collect()``, so a figure does not pay for collecting the
garbage of the run before it (whole registries of jobs, freed by the cyclic collector):
without it a full collection of the previous run's 30,000 jobs (30-50 ms) fell into the
next run's 0.5 s of latency samples and was its p99.

PostgreSQL is measured when ``TRIO_JOBS_PG_DSN`` is set or the server binaries are
installed (a throw-away cluster is started, as in the tests; note that it runs with
``fsync=off`` and ``synchronous_commit=off``). SQLite runs on a file in a temp dir with
its default ``synchronous=NORMAL``.

Run: ``python -m benchmarks.bench_store [--seconds S] [--events N] [--repeat R]
[--only jobs,latency,narrate]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from trio_jobs import JobRegistry, narrate, open_job_runner, run_persistence
from trio_jobs._persist import _task
from trio_jobs._persist._writer import Persister, _Part
from trio_jobs._stores import JobStore, MemoryStore, PostgresStore, SQLiteStore

from ._util import now

StoreMaker = Callable[[], JobStore | None]
BASELINE = "no store"
SUBMITTERS = 32


async def trivial(job_id: str, payload: Any) -> None:
    await trio.lowlevel.checkpoint()


async def many_events(job_id: str, payload: Any) -> None:
    n = payload["n"]
    for i in range(n):
        narrate("token", "t", i=i)
        if i % 100 == 99:
            await trio.lowlevel.checkpoint()


class _StoredOnly(Persister):
    """The alternative design, for measurement only: readers see an event id once the
    event itself is stored (not once the id is reserved)."""

    def _part(self, job: Any, old: Any, now_trio: float, now: float) -> _Part:
        part = super()._part(job, old, now_trio, now)
        part.reserved = min(part.reserved, part.top)
        return part


@contextlib.contextmanager
def _stored_only() -> Iterator[None]:
    namespace = vars(_task)  # run_persistence makes its Persister from here
    saved = namespace["Persister"]
    namespace["Persister"] = _StoredOnly
    try:
        yield
    finally:
        namespace["Persister"] = saved


@contextlib.asynccontextmanager
async def registry_for(
    store: JobStore | None,
    *,
    headroom: int = 256,
    stored_only: bool = False,
    event_log_size: int = 10_000,
) -> AsyncIterator[JobRegistry]:
    """A registry persisted to ``store`` (none: the baseline), started as
    ``open_registry`` does, with ``headroom`` passed to ``run_persistence``."""
    registry = JobRegistry(store=store, retention=None, event_log_size=event_log_size)
    if store is None:
        await trio.lowlevel.checkpoint()
        yield registry
        return
    async with trio.open_nursery() as nursery:
        with _stored_only() if stored_only else contextlib.nullcontext():
            start = functools.partial(run_persistence, registry, store, headroom=headroom)
            persister = await nursery.start(start)
        assert isinstance(persister, _StoredOnly) == stored_only
        try:
            yield registry
        finally:
            nursery.cancel_scope.cancel()


async def _submit_for(
    reg: JobRegistry, seconds: float, submitters: int, latencies: list[float] | None = None
) -> list[str]:
    """``submitters`` tasks submitting in a loop for ``seconds``; the ids."""
    ids: list[str] = []
    deadline = now() + seconds

    async def submitter() -> None:
        while now() < deadline:
            start = now()
            ids.append(await reg.submit(None))
            if latencies is not None:
                latencies.append(now() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(submitters):
            nursery.start_soon(submitter)
    return ids


async def durable_jobs_per_second(make: StoreMaker, seconds: float) -> float:
    gc.collect()
    async with registry_for(make()) as reg, open_job_runner(reg, trivial):
        start = now()
        ids = await _submit_for(reg, seconds, SUBMITTERS)
        for job_id in ids:
            await reg.wait(job_id)
        elapsed = now() - start
    return len(ids) / elapsed


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def submit_latency(make: StoreMaker, seconds: float, submitters: int) -> tuple[float, float]:
    """(p50, p99) of ``await submit`` in seconds."""
    latencies: list[float] = []
    gc.collect()
    async with registry_for(make()) as reg, open_job_runner(reg, trivial):
        ids = await _submit_for(reg, seconds, submitters, latencies)
        for job_id in ids:
            await reg.wait(job_id)
    return _percentile(latencies, 0.50), _percentile(latencies, 0.99)


@dataclass
class Delivery:
    events_per_s: float
    delivered: int
    skipped: int


async def narrate_to_subscriber(
    make: StoreMaker, n: int, *, event_log_size: int, headroom: int = 256, stored_only: bool = False
) -> Delivery:
    gc.collect()
    async with (
        registry_for(
            make(), headroom=headroom, stored_only=stored_only, event_log_size=event_log_size
        ) as reg,
        open_job_runner(reg, many_events),
    ):
        start = now()
        job_id = await reg.submit({"n": n})
        stream = reg.open_stream(job_id)
        received = 0
        while True:
            await stream.wait_ready()
            items = stream.receive_batch(4096)
            if not items:
                break
            received += len(items)
        elapsed = now() - start
        delivered = received - 1  # the terminal signal
        assert delivered + stream.skipped == n, (delivered, stream.skipped, n)
    return Delivery(delivered / elapsed, delivered, stream.skipped)


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


@dataclass
class Results:
    jobs: dict[str, list[float]]
    latency: dict[tuple[str, int], list[tuple[float, float]]]
    events: dict[tuple[str, str], list[Delivery]]


NARRATE_VARIANTS: dict[str, dict[str, Any]] = {
    "SQLite reservation (headroom=256)": {"headroom": 256},
    "SQLite headroom=0": {"headroom": 0},
    "SQLite stored only (delivery once stored)": {"headroom": 0, "stored_only": True},
}


SECTIONS = ("jobs", "latency", "narrate")


async def run(
    seconds: float, n_events: int, repeat: int, sections: tuple[str, ...] = SECTIONS
) -> Results:
    tmp = Path(tempfile.mkdtemp(prefix="trio-jobs-bench-"))
    counter = iter(range(1_000_000))
    dsn = _pg_dsn() if "jobs" in sections or "latency" in sections else None
    schemas: list[str] = []

    def sqlite() -> JobStore:
        return SQLiteStore(tmp / f"bench{next(counter)}.db")

    def postgres() -> JobStore:
        assert dsn is not None
        schemas.append(f"bench_{os.getpid()}_{next(counter)}")
        return PostgresStore(dsn, schema=schemas[-1])

    kinds: dict[str, StoreMaker] = {
        BASELINE: lambda: None,
        "MemoryStore": MemoryStore,
        "SQLiteStore": sqlite,
    }
    if dsn is not None:
        kinds["PostgresStore"] = postgres
    durable = {name: make for name, make in kinds.items() if name not in (BASELINE, "MemoryStore")}
    logs = {"log 10,000": 10_000, f"log {n_events:,}": n_events + 1}
    res = Results({}, {}, {})
    try:
        for make in kinds.values():  # warm-up: imports, thread pool, first connections
            await durable_jobs_per_second(make, 0.2)
        for _ in range(repeat):
            for name, make in kinds.items() if "jobs" in sections else ():
                res.jobs.setdefault(name, []).append(await durable_jobs_per_second(make, seconds))
            for name, make in durable.items() if "latency" in sections else ():
                for submitters in (1, SUBMITTERS):
                    res.latency.setdefault((name, submitters), []).append(
                        await submit_latency(make, seconds / 2, submitters)
                    )
            for log_name, size in logs.items() if "narrate" in sections else ():
                res.events.setdefault((BASELINE, log_name), []).append(
                    await narrate_to_subscriber(kinds[BASELINE], n_events, event_log_size=size)
                )
                for variant, options in NARRATE_VARIANTS.items():
                    res.events.setdefault((variant, log_name), []).append(
                        await narrate_to_subscriber(
                            sqlite, n_events, event_log_size=size, **options
                        )
                    )
    finally:
        for schema in schemas:
            assert dsn is not None
            await _drop_schema(dsn, schema)
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _verdict(ratio: float, target: float, above: bool = True) -> str:
    ok = ratio >= target if above else ratio <= target
    return "meets" if ok else "MISSES"


def report(res: Results) -> str:
    med = statistics.median
    lines = [f"1. jobs/s with the durable ack ({SUBMITTERS} submitters, trivial executor)"]
    base = med(res.jobs[BASELINE]) if res.jobs else 1.0
    for name, values in res.jobs.items():
        lines.append(f"   {name:<20}{med(values):>10,.0f} jobs/s  {med(values) / base:6.2f}x")
    for name, target in {"SQLiteStore": 0.5, "PostgresStore": 0.3}.items():
        if name in res.jobs:
            ratio = med(res.jobs[name]) / base
            verdict = _verdict(ratio, target)
            lines.append(f"   {name} {ratio:.2f}x {verdict} the >= {target}x target")

    lines.append("2. submit latency with the durable ack (ms)")
    for (name, submitters), pairs in res.latency.items():
        p50 = med(v[0] for v in pairs) * 1000
        p99 = med(v[1] for v in pairs) * 1000
        who = "1 submitter" if submitters == 1 else f"{submitters} submitters"
        line = f"   {name:<15}{who:<15} p50 {p50:7.2f}  p99 {p99:7.2f}"
        if name == "SQLiteStore":
            line += f"  ({_verdict(p99, 10.0, above=False)} the p99 <= 10 ms target)"
        lines.append(line)

    lines.append("3. narrate -> subscriber events/s (one job, one subscriber)")
    bases = {log: med(d.events_per_s for d in res.events[(BASELINE, log)]) for _, log in res.events}
    for (name, log), runs in res.events.items():
        rate = med(d.events_per_s for d in runs)
        skipped = med(d.skipped for d in runs)
        ratio = rate / bases[log]
        line = f"   {name:<42}{log:<13}{rate:>10,.0f} ev/s  {ratio:6.2f}x  skipped {skipped:>8,.0f}"
        if name != BASELINE:
            line += f"  ({_verdict(ratio, 0.8)} >= 0.8x)"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--seconds", type=float, default=1.0, help="submitting time per run")
    parser.add_argument("--events", type=int, default=200_000, help="events narrated per run")
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    results = trio.run(run, args.seconds, args.events, args.repeat, sections)
    print(report(results))


if __name__ == "__main__":
    main()
