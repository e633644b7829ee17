"""Two queens sharing one PostgreSQL store: any queen answers for any job.

Starts a hive and two queens (``trio-jobs queen --store postgres:DSN``) as real processes
on loopback, then shows:

1. a job submitted to queen A is read, followed and cancelled through queen B;
2. jobs submitted to both queens each run exactly once (the hive saw each of them once);
3. a queen killed mid-job (SIGKILL) leaves its job to the other one, which ends it
   ``[ERROR] interrupted`` once the dead queen's lease has run out.

The tables go into a fresh schema, dropped at the end.

Run: ``python examples/shared_queens.py postgresql://user@host/db`` (or set
``TRIO_JOBS_PG_DSN``). Without a server at hand: ``apt-get install postgresql`` and let
``pytest tests/test_examples.py`` start a throw-away one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import trio

from servers._launch import Daemon, running_daemon
from trio_jobs import JobClient, NarrationEvent, PostgresStore, TerminalSignal

WAITING = {"operation": "infer", "model": "nobody", "prompt": "hello"}
"""No worker serves this model, so the job keeps running (waiting for one) until stopped."""


async def follow(client: JobClient, job_id: str, label: str) -> str:
    """Print a job's stream as seen through one queen; return its terminal line."""
    end = ""
    async with client.stream(job_id) as stream:
        async for item in stream:
            if isinstance(item, NarrationEvent):
                print(f"  {label} | {item.human}")
            elif isinstance(item, TerminalSignal):
                end = item.wire
    print(f"  {label} | {end}")
    return end


async def wait_state(client: JobClient, job_id: str, state: str) -> None:
    """Poll the job's record until it is in ``state`` (a queen pushes no state changes)."""
    with trio.fail_after(15):
        while True:
            if (await client.get(job_id))["state"] == state:
                return
            await trio.sleep(0.05)


async def demo(dsn: str, schema: str, root: Path) -> None:
    async with AsyncExitStack() as stack:
        logs = {name: stack.enter_context((root / f"{name}.log").open("wb")) for name in "hab"}
        hive = await stack.enter_async_context(
            running_daemon(
                ["hive", "--port", "0", "--store", "memory", "--models-dir", str(root)],
                stderr=logs["h"],
            )
        )
        common = [
            *("queen", "--port", "0", "--store", f"postgres:{dsn}", "--pg-schema", schema),
            *("--hive", f"localhost={hive.url}", "--schedule-wait", "60", "--lease", "1"),
        ]
        queens: dict[str, Daemon] = {}
        for name in "ab":
            queens[name] = await stack.enter_async_context(
                running_daemon([*common, "--node", name], stderr=logs[name])
            )
            print(f"queen {name} listening on {queens[name].url}")
        a = await stack.enter_async_context(JobClient(queens["a"].url))
        b = await stack.enter_async_context(JobClient(queens["b"].url))

        print("\n1. a job submitted to queen a, seen and cancelled through queen b")
        job_id = await a.submit(WAITING)
        await wait_state(a, job_id, "running")
        print(f"  b sees {job_id}: {(await b.get(job_id))['state']}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow, b, job_id, "b")
            await trio.sleep(0.3)
            await b.cancel(job_id)
        # Either queen may have claimed the job; the other's record of it follows the
        # store's notices a moment later.
        await wait_state(a, job_id, "cancelled")
        print(f"  a says: {(await a.get(job_id))['state']}")

        print("\n2. ten jobs submitted to both queens")
        ids = [await (a, b)[i % 2].submit({"operation": "model_list"}) for i in range(10)]
        async with PostgresStore(dsn, schema=schema) as store:
            for i, job_id in enumerate(ids):
                await (a, b)[i % 2].wait(job_id)
                stored = await store.load_job(job_id)
                owner = stored.owner if stored else "?"
                print(f"  {job_id} submitted to {'ab'[i % 2]}, ran on {owner}")
        async with httpx.AsyncClient(timeout=5) as http:
            seen = (await http.get(f"{hive.url}/v1/jobs")).json()["jobs"]
        if sorted(j["payload"]["operation"] for j in seen) != ["model_list"] * len(ids):
            raise SystemExit(f"the hive ran {len(seen)} jobs for {len(ids)} submitted")
        print(f"  the hive ran {len(seen)} jobs: each ran exactly once")

        print("\n3. a queen killed mid-job")
        job_id = await a.submit(WAITING)
        await wait_state(a, job_id, "running")
        async with PostgresStore(dsn, schema=schema) as store:
            stored = await store.load_job(job_id)
        owner = stored.owner if stored and stored.owner in ("a", "b") else "a"
        survivor = b if owner == "a" else a
        queens[owner].kill()
        print(f"  queen {owner} (running {job_id}) got SIGKILL")
        await wait_state(survivor, job_id, "failed")
        await follow(survivor, job_id, "a" if owner == "b" else "b")
        print("  taken over by the surviving queen")


async def drop_schema(dsn: str, schema: str) -> None:
    def drop() -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    await trio.to_thread.run_sync(drop)


async def main(dsn: str) -> None:
    schema = f"trio_jobs_example_{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="shared-queens-") as tmp:
        try:
            await demo(dsn, schema, Path(tmp))
        except BaseException:
            for name in ("hive", "a", "b"):
                path = Path(tmp) / f"{name[0]}.log"
                if path.exists():
                    text = path.read_text(errors="replace")[-2000:]
                    print(f"--- {name} log ---\n{text}", file=sys.stderr)
            raise
        finally:
            with trio.CancelScope(shield=True):
                await drop_schema(dsn, schema)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", nargs="?", default=os.environ.get("TRIO_JOBS_PG_DSN"))
    args: Any = parser.parse_args()
    if not args.dsn:
        parser.exit(2, "give a PostgreSQL DSN (argument or TRIO_JOBS_PG_DSN)\n")
    trio.run(main, args.dsn)
