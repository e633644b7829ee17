"""A queen on a SQLite file, killed with SIGKILL mid-job and started again on that file.

Real processes: a queen, a worker generating tokens slowly (it heartbeats to the queen),
and the queen's successor. Also the ``--store`` option itself: its parsing, the default
SQLite file in the state directory, and the lock that keeps a second daemon off a file in
use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from servers._store import StoreSpec, default_state_dir, parse_store, resolve_store
from tests.daemons import Cluster, closed_port, collect, wait_idle
from trio_jobs import JobClient, NarrationEvent, SQLiteStore, TerminalSignal

CAP = 35.0


async def _stored_up_to(db: Path, job_id: str, event_id: int, within_s: float = 5.0) -> None:
    """Wait until the queen's SQLite file holds the job's events up to ``event_id``."""
    with trio.fail_after(within_s):
        while True:
            async with SQLiteStore(db) as store:
                events = await store.load_events(job_id)
            if events and events[-1].id >= event_id:
                return
            await trio.sleep(0.02)


def _queen_argv(db: Path, ghost: str) -> list[str]:
    return [
        *("queen", "--port", "0", "--store", f"sqlite:{db}"),
        *("--hive", f"localhost={ghost}", "--schedule-wait", "60", "--heartbeat-ttl", "30"),
    ]


async def test_a_killed_queen_restarted_on_its_sqlite_file_recovers_every_job(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state" / "queen.db"
    ghost = f"http://127.0.0.1:{closed_port()}"
    cluster = Cluster(tmp_path)
    try:
        with trio.fail_after(CAP):
            queen = cluster.start("queen", _queen_argv(db, ghost))
            worker = cluster.start(
                "worker",
                [
                    *("worker", "--port", "0", "--queen", queen, "--model", "slow"),
                    *("--token-delay", "0.1", "--heartbeat-s", "0.2"),
                ],
            )
            async with JobClient(queen) as client:
                done_id, done_events, terminal = await collect(client, {"operation": "status"})
                assert terminal is not None and terminal.wire == "[DONE]"
                infer = {"operation": "infer", "model": "slow", "prompt": "p", "max_tokens": 500}
                infer_id = await client.submit(infer)
                # No worker serves this model: the job waits for one (running) until the
                # queen dies; its retry policy allows one more attempt.
                waiting = {"operation": "infer", "model": "nobody", "prompt": "p"}
                waiting_id = await client.submit(waiting, retry={"max_attempts": 2})
                seen: list[NarrationEvent] = []
                async with client.stream(infer_id) as stream:
                    async for item in stream:
                        assert isinstance(item, NarrationEvent), item
                        seen.append(item)
                        if sum(e.action == "token" for e in seen) >= 5:
                            break
                while (await client.get(waiting_id))["state"] != "running":
                    await trio.sleep(0.02)
            await _stored_up_to(db, infer_id, seen[-1].id)
            assert cluster.kill("queen") == -9
            # The worker's job was forwarded with on_disconnect=cancel: it stops too.
            await wait_idle(worker)

            successor = cluster.start("successor", _queen_argv(db, ghost))
            async with JobClient(successor) as client:
                jobs = {job["job_id"]: job for job in await client.list_jobs()}
                assert set(jobs) == {done_id, infer_id, waiting_id}
                assert jobs[done_id]["state"] == "completed"
                assert jobs[infer_id]["state"] == "failed"
                assert jobs[infer_id]["error"] == "interrupted"
                record = await client.get(infer_id)
                assert (record["state"], record["error"]) == ("failed", "interrupted")

                # Its stream replays what was stored (at least what the first queen had
                # streamed, identically), then the outcome.
                _, replay, end = await _read(client, infer_id)
                assert end is not None and end.wire == "[ERROR] interrupted"
                assert replay[: len(seen)] == seen
                # then one event announcing the ids the first queen had reserved past its
                # last stored event (any of them may have reached a reader): never reused
                stored = [e for e in replay if e.action != "events_lost"]
                assert [e.id for e in stored] == list(range(1, len(stored) + 1))
                (lost,) = [e for e in replay if e.action == "events_lost"]
                assert lost.fields["lost"]["first"] == len(stored) + 1
                assert lost.id == lost.fields["lost"]["last"] + 1 == replay[-1].id
                assert end.id == lost.id + 1
                _, done_replay, done_end = await _read(client, done_id)
                assert done_replay == done_events
                assert done_end is not None and done_end.wire == "[DONE]"

                # The job with a retry left was re-queued and runs its second attempt here.
                while (await client.get(waiting_id))["state"] != "running":
                    await trio.sleep(0.02)
                history = await client.history(waiting_id)
                reasons = [entry["reason"] for entry in history]
                assert "interrupted; re-queued for attempt 2 of 2" in reasons
                assert (await client.get(waiting_id))["attempts"] == 2
                await client.cancel(waiting_id)
                _, _, cancelled = await _read(client, waiting_id)
                assert cancelled is not None and cancelled.wire == "[CANCELLED]"
            await wait_idle(successor)
    finally:
        codes = cluster.close()
    assert codes["successor"] == 0 and codes["worker"] == 0, codes


async def _read(
    client: JobClient, job_id: str
) -> tuple[str, list[NarrationEvent], TerminalSignal | None]:
    events: list[NarrationEvent] = []
    terminal: TerminalSignal | None = None
    async with client.stream(job_id) as stream:
        async for item in stream:
            if isinstance(item, NarrationEvent):
                events.append(item)
            else:
                terminal = item
    return job_id, events, terminal


async def test_a_hive_keeps_its_jobs_in_the_state_dir_of_its_config(tmp_path: Path) -> None:
    """The default store named after the hive's id, in the ``state_dir`` of a config
    file's ``[hive]`` table; the restarted hive lists the jobs of the first one."""
    config = tmp_path / "trio-jobs.toml"
    state = tmp_path / "state"
    config.write_text(f'[hive]\nstate_dir = "{state}"\nhive_id = "gpu"\n')
    argv = ["hive", "--port", "0", "--config", str(config), "--models-dir", str(tmp_path)]
    cluster = Cluster(tmp_path)
    try:
        with trio.fail_after(CAP):
            hive = cluster.start("hive", argv)
            async with JobClient(hive) as client:
                job_id, _, terminal = await collect(client, {"operation": "model_list"})
                assert terminal is not None and terminal.wire == "[DONE]"
            assert cluster.close() == {"hive": 0}  # SIGTERM: pending writes are flushed
            assert (state / "hive-gpu.db").exists()
            again = cluster.start("again", argv)
            async with JobClient(again) as client:
                jobs = await client.list_jobs()
                assert [(j["job_id"], j["state"]) for j in jobs] == [(job_id, "completed")]
    finally:
        cluster.close()


async def test_a_second_daemon_on_a_store_in_use_fails_clearly(tmp_path: Path) -> None:
    state = tmp_path / "s"
    cluster = Cluster(tmp_path)
    try:
        cluster.start("hive", ["hive", "--port", "0", "--state-dir", str(state)])
        with trio.fail_after(20):
            result = await trio.run_process(
                [sys.executable, "-m", "servers", "hive", "--port", "0", "--state-dir", str(state)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                stdin=subprocess.DEVNULL,
            )
    finally:
        codes = cluster.close()
    assert codes == {"hive": 0}
    assert result.returncode == 1 and result.stdout == b""
    assert b"hive.db is in use by another daemon" in result.stderr
    assert (tmp_path / "s" / "hive.db").exists()


async def test_a_store_that_cannot_be_opened_fails_clearly() -> None:
    """Before listening, naming the store (but not its DSN, which may hold a password)."""
    dsn = f"postgres:host=127.0.0.1 port={closed_port()} user=u password=hush"
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-m", "servers", "queen", "--port", "0", "--store", dsn],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 1 and result.stdout == b""
    assert b"cannot serve: cannot open the job store postgres:<dsn>: " in result.stderr
    assert b"hush" not in result.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("memory", StoreSpec("memory")),
        ("sqlite:/var/lib/q.db", StoreSpec("sqlite", "/var/lib/q.db")),
        ("postgres:host=db user=q", StoreSpec("postgres", "host=db user=q")),
        ("postgres:postgresql://u@db/q", StoreSpec("postgres", "postgresql://u@db/q")),
        ("postgresql://u@db/q", StoreSpec("postgres", "postgresql://u@db/q")),
        ("postgres://u@db/q", StoreSpec("postgres", "postgres://u@db/q")),
    ],
)
def test_parse_store(value: str, expected: StoreSpec) -> None:
    assert parse_store(value) == expected


@pytest.mark.parametrize("value", ["", "sqlite:", "postgres:", "redis://x", "sqlite", "mem"])
def test_parse_store_refuses(value: str) -> None:
    with pytest.raises(ValueError, match=r"memory, sqlite:PATH or postgres:DSN|needs a"):
        parse_store(value)


def test_sqlite_path_is_absolute_and_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_store("sqlite:q.db").target == str(tmp_path / "q.db")
    assert parse_store("sqlite:~/q.db").target == str(tmp_path / "home" / "q.db")


def test_store_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "trio-jobs"
    config: dict[str, Any] = {}
    default = resolve_store(None, None, config, daemon="queen")
    assert default == StoreSpec("sqlite", str(tmp_path / "xdg" / "trio-jobs" / "queen.db"))
    in_dir = resolve_store(None, str(tmp_path / "d"), config, daemon="hive-gpu 1")
    assert in_dir == StoreSpec("sqlite", str(tmp_path / "d" / "hive-gpu_1.db"))
    config = {"store": "memory", "state_dir": str(tmp_path / "c")}
    assert resolve_store(None, None, config, daemon="queen") == StoreSpec("memory")
    flag = resolve_store("sqlite:/x.db", None, config, daemon="queen")
    assert flag == StoreSpec("sqlite", "/x.db")
    from_config = resolve_store(None, None, {"state_dir": str(tmp_path / "c")}, daemon="q")
    assert from_config.target == str(tmp_path / "c" / "q.db")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "trio-jobs"
    with pytest.raises(ValueError, match="'store' must be a string"):
        resolve_store(None, None, {"store": 3}, daemon="queen")


async def _dropped_job(cluster: Cluster, tmp_path: Path) -> tuple[str, str, list[NarrationEvent]]:
    """A queen on SQLite with 0.5 s retention, and a finished job it dropped from memory:
    (queen URL, job id, the job's events)."""
    db = tmp_path / "queen.db"
    argv = ["queen", "--port", "0", "--store", f"sqlite:{db}", "--retention", "0.5"]
    queen = cluster.start("queen", [*argv, "--hive", f"localhost=http://127.0.0.1:{closed_port()}"])
    async with JobClient(queen) as client:
        job_id, events, terminal = await collect(client, {"operation": "status"})
        assert terminal is not None and terminal.wire == "[DONE]"
    # gone from memory once /metrics counts no completed job held (the list shows the
    # store's jobs, so it keeps listing it)
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):
            while (
                'trio_jobs_jobs{state="completed"} 0.0'
                not in (await http.get(f"{queen}/metrics")).text
            ):
                await trio.sleep(0.05)
    async with JobClient(queen) as client:
        assert [job["job_id"] for job in await client.list_jobs()] == [job_id]
    return queen, job_id, events


async def test_a_job_dropped_by_retention_is_still_read_from_the_store(tmp_path: Path) -> None:
    """GET answers for a job retention dropped from memory, from the store."""
    cluster = Cluster(tmp_path)
    try:
        with trio.fail_after(CAP):
            queen, job_id, _ = await _dropped_job(cluster, tmp_path)
            async with JobClient(queen) as client:
                record = await client.get(job_id)
                assert (record["job_id"], record["state"]) == (job_id, "completed")
    finally:
        cluster.close()


async def test_a_job_dropped_by_retention_still_streams_from_the_store(tmp_path: Path) -> None:
    """History and stream of a job retention dropped are loaded back from the store."""
    cluster = Cluster(tmp_path)
    try:
        with trio.fail_after(CAP):
            queen, job_id, events = await _dropped_job(cluster, tmp_path)
            async with JobClient(queen) as client:
                history = await client.history(job_id)
                states = [entry["state"] for entry in history]
                assert states == ["queued", "running", "completed"]
                _, replay, end = await _read(client, job_id)
                assert replay == events
                assert end is not None and end.wire == "[DONE]"
    finally:
        cluster.close()
