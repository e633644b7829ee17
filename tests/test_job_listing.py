"""``GET /v1/jobs`` reads the store on every store kind: filters, keyset pages, order, and
jobs that retention already dropped from memory; bad parameters are 422 naming them.

Real parts: a hypercorn server on 127.0.0.1, a SQLite file, a PostgreSQL schema (see
tests/pg.py), the JobClient and the keeper CLI process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests import pg
from trio_jobs import JobClient, JobQuery, JobRegistry, MemoryStore, PostgresStore, SQLiteStore
from trio_jobs._run import open_registry
from trio_jobs.http import create_app, serve

CAP = 20.0


async def work(job_id: str, payload: Any) -> None:
    if payload.get("hold"):
        await trio.sleep_forever()
    await trio.lowlevel.checkpoint()


def _store(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(tmp_path / "jobs.db")
    if kind == "postgres":
        return PostgresStore(pg.dsn_or_skip(), schema=pg.fresh_schema())
    return None


@asynccontextmanager
async def _server(kind: str, tmp_path: Path) -> AsyncIterator[tuple[str, JobRegistry]]:
    store = _store(kind, tmp_path)
    retention = 600.0 if store is None else 0.0  # with a store, finished jobs leave memory
    async with (
        open_registry(store, retention=retention) as registry,
        trio.open_nursery() as nursery,
    ):
        url = await nursery.start(serve, create_app(registry, work))
        yield url, registry
        nursery.cancel_scope.cancel()


KINDS = ["none", "memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

SPECS = [
    ("a", {"team": "x", "env": "prod"}),
    ("b", {"team": "x"}),
    ("a", {"team": "y", "env": "prod"}),
    ("a", {"team": "x", "env": "prod"}),
    ("b", {"team": "y", "env": "dev"}),
    ("c", {"team": "x", "env": "prod", "odd": '50%_\\"q'}),
    ("a", {}),
]


async def _submit_all(http: httpx.AsyncClient) -> list[str]:
    ids = []
    for operation, tags in SPECS:
        body = {"operation": operation, "hold": operation == "c", "tags": tags}
        response = await http.post("/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        ids.append(response.json()["job_id"])
        await trio.sleep(0.003)  # distinct creation times
    return ids


async def _wait_settled(http: httpx.AsyncClient, n: int) -> list[dict[str, Any]]:
    with trio.fail_after(5):
        while True:
            jobs = (await http.get("/v1/jobs")).json()["jobs"]
            if sum(j["state"] == "completed" for j in jobs) == n:
                return list(jobs)
            await trio.sleep(0.01)


def _ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [job["job_id"] for job in response.json()["jobs"]]


@pytest.mark.parametrize("kind", KINDS)
async def test_listing_filters_and_pages_through_a_real_socket(kind: str, tmp_path: Path) -> None:
    with trio.fail_after(CAP):
        async with _server(kind, tmp_path) as (url, registry):
            async with httpx.AsyncClient(base_url=url) as http:
                ids = await _submit_all(http)
                jobs = await _wait_settled(http, len(ids) - 1)
                assert [j["job_id"] for j in jobs] == ids  # oldest first
                if kind != "none":  # finished jobs left memory at once; the store has them
                    assert len(registry) == 1

                # pages of 3, both ways; the last page says so
                for order, want in (("asc", ids), ("desc", ids[::-1])):
                    seen: list[str] = []
                    cursor = None
                    pages = 0
                    while True:
                        params = {"limit": "3", "order": order}
                        if cursor:
                            params["cursor"] = cursor
                        response = await http.get("/v1/jobs", params=params)
                        seen += _ids(response)
                        cursor = response.json()["next_cursor"]
                        pages += 1
                        if cursor is None:
                            break
                    assert (seen, pages) == (want, 3)

                get = http.get
                assert _ids(await get("/v1/jobs", params={"state": "running"})) == [ids[5]]
                assert _ids(await get("/v1/jobs?tag=team:x&tag=env:prod")) == [
                    ids[0],
                    ids[3],
                    ids[5],
                ]
                assert _ids(await get("/v1/jobs", params={"tag": 'odd:50%_\\"q'})) == [ids[5]]
                assert _ids(await get("/v1/jobs", params={"tag": "odd:50"})) == []
                assert _ids(await get("/v1/jobs", params={"operation": "b"})) == [ids[1], ids[4]]
                assert _ids(
                    await get("/v1/jobs", params={"operation": "a", "tag": "team:x", "limit": 1})
                ) == [ids[0]]
                since, until = jobs[2]["created_at"], jobs[5]["created_at"]
                assert (
                    _ids(await get("/v1/jobs", params={"since": since, "until": until})) == ids[2:5]
                )
                naive = since.removesuffix("Z")
                assert _ids(await get("/v1/jobs", params={"since": naive})) == ids[2:]

                # the client follows pages; with a limit it stops there
                async with JobClient(url) as client:
                    listed = await client.list_jobs(tag={"env": "prod"}, order="desc")
                    assert [j["job_id"] for j in listed] == [ids[5], ids[3], ids[2], ids[0]]
                    assert len(await client.list_jobs(limit=2)) == 2
                    page = await client.jobs_page(limit=5, operation="a")
                    assert len(page["jobs"]) == 4 and page["next_cursor"] is None

                bad = {
                    "state": "nope",
                    "tag": "no-colon",
                    "limit": "0",
                    "cursor": "zz",
                    "order": "up",
                    "since": "yesterday",
                    "until": "2026-13-01",
                    "operation": "",
                }
                for name, value in bad.items():
                    response = await get("/v1/jobs", params={name: value})
                    assert response.status_code == 422, (name, response.text)
                    assert response.json()["detail"][0]["loc"] == [name]
                assert (await get("/v1/jobs", params={"limit": "1001"})).status_code == 422


async def test_registry_listing_without_a_store_pages_jobs_in_memory() -> None:
    registry = JobRegistry()
    ids = [registry.create_job({"operation": "x"}, tags={"n": str(i % 2)}) for i in range(5)]
    page = await registry.query_jobs(JobQuery(limit=2))
    assert [r.id for r in page.records] == ids[:2] and page.next_cursor
    rest = await registry.query_jobs(JobQuery(cursor=page.next_cursor))
    assert [r.id for r in rest.records] == ids[2:] and rest.next_cursor is None
    odd = await registry.query_jobs(JobQuery(tags=(("n", "1"),), order="desc"))
    assert [r.id for r in odd.records] == [ids[3], ids[1]]
    assert [r.id for r in registry.list_jobs(tag="n:1")] == [ids[1], ids[3]]
    with pytest.raises(ValueError, match="limit"):
        JobQuery(limit=0)


async def test_keeper_jobs_command_filters_and_refuses_bad_filters(tmp_path: Path) -> None:
    with trio.fail_after(CAP):
        async with _server("sqlite", tmp_path) as (url, _registry):
            async with httpx.AsyncClient(base_url=url) as http:
                ids = await _submit_all(http)
                await _wait_settled(http, len(ids) - 1)

            def keeper(*args: str) -> subprocess.CompletedProcess[str]:
                argv = [sys.executable, "-m", "servers", "--queen", url, "--json", "jobs", *args]
                return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)

            done = await trio.to_thread.run_sync(
                keeper, "--tag", "team:x", "--tag", "env:prod", "--order", "desc", "--limit", "2"
            )
            assert done.returncode == 0, done.stderr
            listed = [json.loads(line)["job_id"] for line in done.stdout.splitlines()]
            assert listed == [ids[5], ids[3]]
            bad = await trio.to_thread.run_sync(keeper, "--since", "yesterday")
            assert bad.returncode == 2 and "since" in bad.stderr + bad.stdout
