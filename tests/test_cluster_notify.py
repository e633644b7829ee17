"""Two shared-mode nodes on one PostgreSQL hear each other through LISTEN/NOTIFY.

Polling is switched off (a 60 s poll interval and safety net), so everything here moves
only by notices: a job submitted to B (which runs nothing) is claimed by A at once; its
stream through B is live (each event reaches B's client before the job narrates the
next); a stream through B of a job submitted to A is live too; a cancel sent to B stops
the job on A; and after a restart of the PostgreSQL server the listener is back and
notices flow again. Real parts: PostgreSQL (tests/pg.py), hypercorn on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from tests import pg
from trio_jobs import (
    JobClient,
    JobRegistry,
    NarrationEvent,
    PostgresStore,
    SharedRunner,
    TerminalSignal,
    narrate,
    run_persistence,
    run_shared_jobs,
)
from trio_jobs.http import create_app, serve

pytestmark = pytest.mark.postgres

CAP = 30.0
QUIET = 60.0
"""Poll interval and safety net: longer than the test, so only notices move things."""


class Steps:
    """The executor's side of a ping-pong: step i waits until B's client saw step i-1."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], trio.Event] = {}
        self.running: dict[str, trio.Event] = {}
        self.stopped: dict[str, trio.Event] = {}

    def event(self, table: dict[Any, trio.Event], key: Any) -> trio.Event:
        return table.setdefault(key, trio.Event())

    async def work(self, job_id: str, payload: Any) -> None:
        self.event(self.running, job_id).set()
        if payload.get("hold"):
            try:
                await trio.sleep_forever()
            finally:
                self.event(self.stopped, job_id).set()
        for i in range(payload["steps"]):
            narrate("step", f"step {i}", i=i)
            with trio.fail_after(5):  # B's client must see it before the next
                await self.event(self.seen, (job_id, i)).wait()


@asynccontextmanager
async def two_nodes(
    dsn: str, schema: str, steps: Steps
) -> AsyncIterator[tuple[str, str, list[SharedRunner]]]:
    async with trio.open_nursery() as nursery:
        urls, runners = [], []
        for node, claims in (("a", True), ("b", False)):
            registry = JobRegistry(store=PostgresStore(dsn, schema=schema, node=node))
            runner = await nursery.start(
                partial(
                    run_shared_jobs,
                    registry,
                    steps.work,
                    claim=claims,
                    poll_interval=QUIET,
                    lease=QUIET,
                )
            )
            runner.safety_interval = QUIET
            runners.append(runner)
            urls.append(await nursery.start(serve, create_app(registry, None)))
        with trio.fail_after(5):
            while not all(r.listening for r in runners):
                await trio.sleep(0.01)
        yield urls[0], urls[1], runners
        nursery.cancel_scope.cancel()


def _notify(dsn: str, channel: str, payloads: list[str]) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def _stream(url: str, job_id: str, steps: Steps) -> str:
    """Read the job's stream at ``url``, acknowledging each step; the terminal signal."""
    async with JobClient(url) as client, client.stream(job_id) as stream:
        async for item in stream:
            if isinstance(item, NarrationEvent) and item.action == "step":
                steps.event(steps.seen, (job_id, item.fields["i"])).set()
            elif isinstance(item, TerminalSignal):
                return item.wire
    return ""


async def _live_streams_and_a_cancel(a: str, b: str, steps: Steps) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        # submitted to B, run on A, streamed through B: each step needs B's client
        answer = await http.post(f"{b}/v1/jobs", json={"steps": 5})
        assert answer.status_code == 201, answer.text
        job_id = answer.json()["job_id"]
        assert await _stream(b, job_id, steps) == "[DONE]"
        # submitted to A, streamed through B
        job_id = (await http.post(f"{a}/v1/jobs", json={"steps": 5})).json()["job_id"]
        assert await _stream(b, job_id, steps) == "[DONE]"
        # a cancel sent to B stops the job running on A
        held = (await http.post(f"{b}/v1/jobs", json={"hold": True})).json()["job_id"]
        await steps.event(steps.running, held).wait()
        answer = await http.delete(f"{b}/v1/jobs/{held}")
        assert answer.status_code == 200, answer.text
        await steps.event(steps.stopped, held).wait()
        async with JobClient(b) as client:
            with trio.fail_after(5):
                while (await client.get(held))["state"] != "cancelled":
                    await trio.sleep(0.01)


async def test_streams_and_cancels_through_the_other_node_move_by_notices() -> None:
    steps = Steps()
    dsn, schema = pg.dsn_or_skip(), pg.fresh_schema()
    with trio.fail_after(CAP):
        async with two_nodes(dsn, schema, steps) as (a, b, runners):
            # anyone may notify the channel: nonsense is ignored
            channel = runners[0].store.channel  # type: ignore[attr-defined]
            junk = ["e", "e x", "e x [[1]]", "e x {", "zzz", "c", "w", "q", "f nobody"]
            await trio.to_thread.run_sync(_notify, dsn, channel, junk)
            await _live_streams_and_a_cancel(a, b, steps)
            # either node lists every job of the table, whoever created or ran it
            async with httpx.AsyncClient() as http:
                listed = [(await http.get(f"{url}/v1/jobs")).json()["jobs"] for url in (a, b)]
            assert listed[0] == listed[1]
            assert [j["state"] for j in listed[0]] == ["completed", "completed", "cancelled"]


@pytest.mark.slow
async def test_the_listener_comes_back_after_a_postgres_restart() -> None:
    bin_dir = pg.find_bin_dir()
    if bin_dir is None:
        pg.dsn_or_skip()
    assert bin_dir is not None
    own = pg.Cluster(bin_dir)
    try:
        dsn = own.start()
        steps = Steps()
        with trio.fail_after(CAP + 30):
            async with two_nodes(dsn, "notify_restart", steps) as (a, b, runners):
                await trio.to_thread.run_sync(own.down)
                with trio.fail_after(10):
                    while any(r.listening for r in runners):
                        await trio.sleep(0.05)
                await trio.to_thread.run_sync(own.up)
                with trio.fail_after(15):  # reconnect backoff is at most 5 s
                    while not all(r.listening for r in runners):
                        await trio.sleep(0.05)
                    async with httpx.AsyncClient() as http:
                        for url in (a, b):
                            while (await http.get(f"{url}/health")).status_code != 200:
                                await trio.sleep(0.05)
                            # a node's first write on the connection the restart closed
                            # fails (503, retry): it reconnects on the next
                            while (
                                await http.post(f"{url}/v1/jobs", json={"steps": 0})
                            ).status_code != 201:
                                await trio.sleep(0.05)
                await _live_streams_and_a_cancel(a, b, steps)
    finally:
        own.stop()


async def test_a_followed_jobs_events_reach_the_other_node_before_they_are_stored() -> None:
    """The owner relays a followed job's events as its own readers may see them: with a
    group commit that would wait longer than the test, B's client still sees each step
    before the next is narrated, while the store holds none of them yet."""
    steps = Steps()
    dsn, schema = pg.dsn_or_skip(), pg.fresh_schema()
    stored: list[int] = []

    async def work(job_id: str, payload: Any) -> None:
        await steps.work(job_id, payload)
        stored.append(len(await a_store.load_events(job_id)))

    a_store = PostgresStore(dsn, schema=schema, node="a")
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            urls = []
            a_registry = JobRegistry(store=a_store)
            await nursery.start(partial(run_persistence, a_registry, interval=QUIET))
            for node, registry in (("a", a_registry), ("b", None)):
                if registry is None:
                    registry = JobRegistry(store=PostgresStore(dsn, schema=schema, node=node))
                runner = await nursery.start(
                    partial(
                        run_shared_jobs,
                        registry,
                        work,
                        claim=node == "a",
                        max_concurrent=1,  # no claim round flushes while the job runs
                        poll_interval=QUIET,
                        lease=QUIET,
                    )
                )
                runner.safety_interval = QUIET
                with trio.fail_after(5):
                    while not runner.listening:
                        await trio.sleep(0.01)
                urls.append(await nursery.start(serve, create_app(registry, None)))
            a, b = urls
            async with httpx.AsyncClient(timeout=10) as http:
                job_id = (await http.post(f"{a}/v1/jobs", json={"steps": 5})).json()["job_id"]
            assert await _stream(b, job_id, steps) == "[DONE]"
            assert stored == [0]  # nothing of it was written while it ran
            async with JobClient(b) as client:  # and B's copy is the stored one
                record = await client.get(job_id)
            assert record["state"] == "completed"
            nursery.cancel_scope.cancel()
