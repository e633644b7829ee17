"""One cluster: queens on one PostgreSQL schema share workers and hives through the store.

Real processes on 127.0.0.1: a hive, its tiny workers, two queens (``--store postgres``,
see tests/pg.py), and a queen on a SQLite file. A worker heartbeating to queen A is
scheduled through queen B, and still after A is killed (the worker turns to B, which A
named in its heartbeat answers); hives registered or SSH-imported on one queen are known
to the other and after a restart, on PostgreSQL and on SQLite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests import pg
from tests.daemons import Cluster, collect
from trio_jobs import JobClient

CAP = 60.0
SSH_CONFIG = """\
Host gpu-1
    HostName 10.0.0.21
Host gpu-2 gpu-*
    HostName 10.0.0.22
"""


async def _get(url: str, path: str) -> Any:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"{url}{path}")
        response.raise_for_status()
        return response.json()


async def _until(url: str, path: str, check: Any, within_s: float = 5.0) -> Any:
    with trio.fail_after(within_s):
        while True:
            data = await _get(url, path)
            if check(data):
                return data
            await trio.sleep(0.05)


def _aliases(data: dict[str, Any]) -> set[str]:
    return {h["alias"] for h in data["hives"]}


async def _runs_on(client: JobClient, job_id: str, node: str) -> bool:
    history = await client.history(job_id)
    return any(h["reason"] == f"started on {node}" for h in history)


async def _infer(client: JobClient) -> tuple[str, str]:
    """An ``infer`` through ``client``'s queen: (terminal signal, node that ran it)."""
    body = {"operation": "infer", "model": "tiny", "prompt": "hello", "max_tokens": 4}
    job_id, _, terminal = await collect(client, body, timeout_s=20)
    history = await client.history(job_id)
    ran = [h["reason"] for h in history if h["state"] == "running"]
    return (terminal.wire if terminal else ""), (ran[-1] if ran else "")


@pytest.mark.postgres
async def test_queens_on_one_postgres_share_workers_and_hives(tmp_path: Path) -> None:
    dsn, schema = pg.dsn_or_skip(), pg.fresh_schema()
    cluster = Cluster(tmp_path)
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(SSH_CONFIG)
    try:
        hive = cluster.start(
            "hive", ["hive", "--port", "0", "--store", "memory", "--models-dir", str(tmp_path)]
        )
        common = [
            *("queen", "--port", "0", "--store", f"postgres:{dsn}", "--pg-schema", schema),
            *("--hive", f"localhost={hive}", "--heartbeat-ttl", "2", "--lease", "2"),
            *("--schedule-wait", "10"),
        ]
        with trio.fail_after(CAP):
            a = cluster.start("a", [*common, "--node", "a", "--max-concurrent", "1"])
            b = cluster.start("b", [*common, "--node", "b"])
            async with JobClient(a) as ca, JobClient(b) as cb:
                # a worker that heartbeats to A only
                body = {"operation": "worker_spawn", "model": "tiny", "queen_url": a}
                _, events, terminal = await collect(ca, body, timeout_s=30)
                assert terminal is not None and terminal.wire == "[DONE]", events
                seen = await _until(b, "/v1/workers", lambda d: d["workers"])
                assert [(w["model"], w["via"]) for w in seen["workers"]] == [("tiny", "a")]

                # every infer through B works, whichever queen claims it
                results = [await _infer(cb) for _ in range(4)]
                assert {signal for signal, _ in results} == {"[DONE]"}, results
                # A full (one slot, taken by a job waiting for a worker of another
                # model): B runs the infers itself, on A's worker
                waiting = {"operation": "infer", "model": "nobody", "prompt": "p"}
                held = []
                with trio.fail_after(10):
                    while not held or not await _runs_on(ca, held[-1], "a"):
                        held.append(await ca.submit(waiting))
                        await trio.sleep(0.3)
                results = [await _infer(cb) for _ in range(2)]
                assert results == [("[DONE]", "started on b")] * 2, results
                for job_id in held:
                    await ca.cancel(job_id)

                # hives registered or imported on A: B knows them
                async with httpx.AsyncClient() as http:
                    answer = await http.post(
                        f"{a}/v1/hives", json={"alias": "gpu", "url": "http://10.0.0.9:7834"}
                    )
                    assert answer.status_code == 200, answer.text
                op = {"operation": "hive_import_ssh", "ssh_config_path": str(ssh_config)}
                _, _, terminal = await collect(ca, op)
                assert terminal is not None and terminal.wire == "[DONE]"
                want = {"localhost", "gpu", "gpu-1", "gpu-2"}
                # each queen reads the others' hives every second: either may run the list
                await _until(a, "/v1/hives", lambda d: _aliases(d) == want)
                hives = await _until(b, "/v1/hives", lambda d: _aliases(d) == want)
                by_alias = {h["alias"]: h for h in hives["hives"]}
                assert by_alias["gpu-2"] == {
                    "alias": "gpu-2",
                    "url": "http://10.0.0.22:7834",
                    "ssh_host": "gpu-2",
                }
                _, events, _ = await collect(cb, {"operation": "hive_list"})
                listed = {h["alias"] for e in events for h in e.fields.get("hives", [])}
                assert listed == want

            # A dies: its worker turns to B, which keeps scheduling on it
            assert cluster.kill("a") == -9
            # the worker's next beats (every 1 s) fail on A and go to B; A's last record
            # of it ages out of the TTL (2 s)
            try:
                await _until(
                    b,
                    "/v1/workers",
                    lambda d: [w["via"] for w in d["workers"]] == [None],
                    within_s=10.0,
                )
            except trio.TooSlowError:
                raise AssertionError(
                    f"B never heard the worker itself\n{cluster.log('hive')}\n{cluster.log('b')}"
                ) from None
            async with JobClient(b) as cb:
                signal, ran = await _infer(cb)
                assert (signal, ran) == ("[DONE]", "started on b"), cluster.log("b")

            # a queen started afresh on the schema knows every hive at once
            store = ["--store", f"postgres:{dsn}", "--pg-schema", schema]
            c = cluster.start("c", ["queen", "--port", "0", *store, "--node", "c"])
            assert _aliases(await _get(c, "/v1/hives")) == want
    finally:
        cluster.close()


async def test_hives_registered_and_imported_outlive_a_restart_on_sqlite(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(SSH_CONFIG)
    argv = ["queen", "--port", "0", "--store", f"sqlite:{tmp_path / 'queen.db'}"]
    try:
        with trio.fail_after(CAP):
            first = cluster.start("first", argv)
            async with httpx.AsyncClient() as http:
                answer = await http.post(
                    f"{first}/v1/hives", json={"alias": "gpu", "url": "http://10.0.0.9:7834/"}
                )
                assert answer.status_code == 200, answer.text
            async with JobClient(first) as client:
                op = {"operation": "hive_import_ssh", "ssh_config_path": str(ssh_config)}
                _, _, terminal = await collect(client, op)
                assert terminal is not None and terminal.wire == "[DONE]"
            want = {"localhost", "gpu", "gpu-1", "gpu-2"}  # localhost: the default hive
            assert _aliases(await _get(first, "/v1/hives")) == want
            assert cluster.kill("first") == -9
            again = cluster.start("again", [*argv, "--hive", "gpu=http://127.0.0.1:9"])
            hives = {h["alias"]: h["url"] for h in (await _get(again, "/v1/hives"))["hives"]}
            hives.pop("localhost")
            # the stored hives are back; the configured one wins over the stored one
            assert hives == {
                "gpu": "http://127.0.0.1:9",
                "gpu-1": "http://10.0.0.21:7834",
                "gpu-2": "http://10.0.0.22:7834",
            }
    finally:
        cluster.close()
