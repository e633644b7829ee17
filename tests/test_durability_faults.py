"""Real faults of a job server's SQLite store, through real sockets: the disk fills up, the
file system turns read-only, a client leaves while its submission waits for the commit.

The disk is a small tmpfs the test mounts (root or CAP_SYS_ADMIN; skipped otherwise, but
failed when ``CI`` is set and we are root). Linux refuses to remount a file system
read-only while a file on it is open for writing, and the store keeps its SQLite file open:
the read-only test first fills the disk so the store drops its connection after the error,
and remounts while it is closed, as an ``errors=remount-ro`` file system would be.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import trio

from trio_jobs import JobRegistry, JobState, SQLiteStore, narrate
from trio_jobs._persist import persister_of
from trio_jobs.http import create_app, serve

CAP = 30.0
TMPFS_SIZE = "1m"
PAD = "x" * 512


def _command(*argv: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError as exc:
        return subprocess.CompletedProcess(argv, 127, "", str(exc))


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``TMPFS_SIZE`` mounted for the test (unmounted after it)."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = _command("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(where))
    if mounted.returncode != 0:
        why = "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): " + (
            mounted.stderr.strip() or f"exit {mounted.returncode}"
        )
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"CI is set and we are root, yet {why}")
        pytest.skip(why)
    try:
        yield where
    finally:
        _command("mount", "-o", "remount,rw", str(where))
        if _command("umount", str(where)).returncode != 0:
            _command("umount", "-l", str(where))


def _fill(where: Path) -> Path:
    """Write a file on ``where`` until the file system is full; returns it."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    block = b"\0" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return filler


def _truncate_wal(db: Path) -> None:
    """Checkpoint the WAL into the database and truncate it to 0 bytes, so the store's
    next write must allocate new space (a WAL reused from its start would not)."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    try:
        for _ in range(100):
            busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if not busy:
                return
        raise AssertionError("the WAL could not be truncated")
    finally:
        conn.close()


async def _remount_ro(where: Path, within_s: float = 10.0) -> None:
    """Remount ``where`` read-only as soon as no file on it is open for writing (the
    store's connection is closed between its attempts to write to a full disk)."""
    with trio.fail_after(within_s):
        while _command("mount", "-o", "remount,ro", str(where)).returncode != 0:
            await trio.sleep(0.005)


async def _health(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health")
    return response.status_code, response.json()


async def _health_until(
    client: httpx.AsyncClient, status: int, within_s: float = 10.0
) -> dict[str, Any]:
    with trio.fail_after(within_s):
        while True:
            code, body = await _health(client)
            if code == status:
                return body
            await trio.sleep(0.01)


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
async def test_a_full_or_read_only_disk_refuses_submissions_and_loses_nothing_acknowledged(
    tmpfs: Path, fault: Literal["disk full", "read-only"]
) -> None:
    """The store's file system fills up (SQLITE_FULL), or turns read-only, while a job
    runs: ``/health`` answers 503 naming the store's error, ``POST /v1/jobs`` gets 503 and
    that job never runs, the running job goes on to its end; once space is freed (and the
    file system is writable again) everything is written: every job answered 201 with its
    end, and every event of the job that ran through the outage."""
    db = tmpfs / "jobs.db"
    release = trio.Event()
    ran: list[str] = []

    async def work(job_id: str, payload: Any) -> None:
        ran.append(job_id)
        if not payload.get("long"):
            narrate("quick", "a quick job", pad=PAD)
            return
        i = 0
        while not release.is_set():
            narrate("tick", f"tick {i}", i=i, pad=PAD)
            i += 1
            with trio.move_on_after(0.01):
                await release.wait()

    registry = JobRegistry(store=SQLiteStore(db))
    acked: list[str] = []
    refused = 0
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, create_app(registry, work))
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:

                async def post(body: dict[str, Any]) -> int:
                    response = await client.post("/v1/jobs", json=body)
                    if response.status_code == 201:
                        acked.append(response.json()["job_id"])
                    else:
                        assert response.status_code == 503, response.text
                        assert response.headers["Retry-After"] == "1"
                        assert "store" in response.json()["detail"], response.text
                    return response.status_code

                assert await post({"long": True}) == 201
                long_id = acked[0]
                for _ in range(3):
                    assert await post({}) == 201
                while registry.running < 1:
                    await trio.sleep(0.01)
                await trio.sleep(0.1)  # its RUNNING state and first ticks are written
                _truncate_wal(db)
                filler = _fill(tmpfs)

                body = await _health_until(client, 503)
                assert body["status"] == "store unavailable"
                assert "full" in body["store"]["error"], body
                if fault == "read-only":
                    await _remount_ro(tmpfs)
                    with trio.fail_after(10):
                        while "full" in (await _health(client))[1]["store"]["error"]:
                            await trio.sleep(0.01)
                    code, body = await _health(client)
                    assert code == 503, body
                    error = body["store"]["error"]
                    assert "unable to open" in error or "readonly" in error, body
                # While the store fails (its writer keeps retrying), submissions get 503.
                # A write that happens to go through in between (SQLite may free space as
                # it closes) is a truthful 201.
                with trio.fail_after(10):
                    while await post({}) != 503:
                        await trio.sleep(0.01)
                refused = len(registry) - len(acked)
                assert refused >= 1
                # The running job goes on during the outage, to its end.
                log = registry.job(long_id).log  # type: ignore[union-attr]
                ticks = log.next_id
                await trio.sleep(0.2)
                assert log.next_id > ticks + 5
                release.set()
                while registry.get(long_id).state is not JobState.COMPLETED:
                    await trio.sleep(0.01)

                if fault == "read-only":
                    assert _command("mount", "-o", "remount,rw", str(tmpfs)).returncode == 0
                filler.unlink()
                await _health_until(client, 200)
                assert (await post({}) == 201) and acked[-1] in registry
                for job_id in acked:
                    response = await client.get(f"/v1/jobs/{job_id}")
                    assert response.status_code == 200
                with trio.fail_after(10):
                    for job_id in acked:
                        while (await client.get(f"/v1/jobs/{job_id}")).json()["state"] != (
                            "completed"
                        ):
                            await trio.sleep(0.01)
                async with client.stream("GET", f"/v1/jobs/{long_id}/stream") as stream:
                    lines = [line async for line in stream.aiter_lines()]
                assert "data: [DONE]" in lines
            nursery.cancel_scope.cancel()
    memory = {job.id: job for job in registry.list_jobs()}
    never_acked = set(memory) - set(acked)
    assert len(never_acked) == refused
    assert not never_acked & set(ran), "a job answered 503 ran"
    narrated = [e for e in registry.events(long_id) if e.action == "tick"]
    async with SQLiteStore(db) as store:
        for job_id in acked:
            stored = await store.load_job(job_id)
            assert stored is not None, f"{job_id} was acknowledged and is lost"
            assert stored.record.state is JobState.COMPLETED, stored.record
        for job_id in never_acked:
            stored = await store.load_job(job_id)
            assert stored is not None and stored.record.state is JobState.FAILED
            assert stored.record.error == "not acknowledged: the store was unavailable"
        events = [e for e in await store.load_events(long_id) if e.action == "tick"]
    assert [e.id for e in events] == [e.id for e in narrated]
    assert [e.human for e in events] == [f"tick {i}" for i in range(len(narrated))]


@pytest.mark.parametrize("on_disconnect", ["detach", "cancel"])
async def test_a_client_leaving_during_its_durable_submit_gets_its_job_failed_never_run(
    tmp_path: Path, on_disconnect: str
) -> None:
    """``POST /v1/jobs`` waits for its commit while another connection holds the SQLite
    write lock; the client closes its socket. The job is recorded FAILED ``not
    acknowledged: the submission was cancelled`` (once the lock is gone, in the file too)
    and never runs, here or after a restart, whatever its ``on_disconnect``."""
    db = tmp_path / "jobs.db"
    ran: list[str] = []

    async def work(job_id: str, payload: Any) -> None:
        ran.append(job_id)
        await trio.lowlevel.checkpoint()

    registry = JobRegistry(store=SQLiteStore(db))
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, create_app(registry, work))
            other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            other.execute("BEGIN IMMEDIATE")  # the store's writes wait for the lock
            try:
                host, port = url.removeprefix("http://").split(":")
                sock = await trio.open_tcp_stream(host, int(port))
                body = f'{{"on_disconnect": "{on_disconnect}"}}'.encode()
                await sock.send_all(
                    b"POST /v1/jobs HTTP/1.1\r\nHost: %s\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (url.removeprefix("http://").encode(), len(body), body)
                )
                while not registry.list_jobs():
                    await trio.sleep(0.01)
                (job_id,) = [job.id for job in registry.list_jobs()]
                persister = persister_of(registry)
                assert persister is not None
                while not persister.unstored(registry.job(job_id)):  # type: ignore[arg-type]
                    await trio.sleep(0.01)
                await trio.sleep(0.2)  # the commit is waiting for the lock
                # Its first attempt may have begun: it waits for that same commit.
                assert not registry.get(job_id).state.is_terminal and not ran
                await sock.aclose()  # the client leaves before any answer
                with trio.fail_after(3):  # well before the lock's busy timeout (5 s)
                    while not registry.get(job_id).state.is_terminal:
                        await trio.sleep(0.01)
                record = registry.get(job_id)
                assert record.state is JobState.FAILED
                assert record.error == "not acknowledged: the submission was cancelled"
            finally:
                other.execute("ROLLBACK")
                other.close()
            with trio.fail_after(10):
                while persister.pending:
                    await trio.sleep(0.01)
            async with httpx.AsyncClient(base_url=url) as client:
                response = await client.get(f"/v1/jobs/{job_id}")
                assert response.json()["error"] == record.error
                after = await client.post("/v1/jobs", json={})
                assert after.status_code == 201
                while response.json()["state"] != "completed":
                    response = await client.get(f"/v1/jobs/{after.json()['job_id']}")
            nursery.cancel_scope.cancel()
    assert ran == [after.json()["job_id"]]
    async with SQLiteStore(db) as store:
        stored = await store.load_job(job_id)
    assert stored is not None and stored.record.state is JobState.FAILED
    assert stored.record.error == "not acknowledged: the submission was cancelled"
    assert [t.state for t in stored.history] == [JobState.QUEUED, JobState.FAILED]
    # restarted on the same file: the job stays failed and does not run
    again = JobRegistry(store=SQLiteStore(db))
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, create_app(again, work))
            await trio.sleep(0.3)
            assert again.get(job_id).state is JobState.FAILED
            nursery.cancel_scope.cancel()
    assert ran == [after.json()["job_id"]]


class _CappedSQLiteStore(SQLiteStore):
    """A SQLite store whose database may not grow past ``max_pages`` (SQLite's own
    ``max_page_count``; None: no cap): its writes then fail with SQLITE_FULL, as on a full
    disk, without needing a file system to fill."""

    max_pages: int | None = None

    def _try_connect_fast(self) -> None:
        """No loop-thread connection: every write goes through :meth:`_call`, where the
        cap is applied (the tmpfs tests cover the loop's connection on a real full disk)."""
        return None

    def _call(self, fn: Any) -> Any:
        def capped(conn: sqlite3.Connection) -> Any:
            cap = self.max_pages if self.max_pages is not None else 1 << 30
            conn.execute(f"PRAGMA max_page_count = {cap}")
            return fn(conn)

        return super()._call(capped)


async def test_a_database_at_its_page_cap_is_an_outage_the_writer_rides_out(
    tmp_path: Path,
) -> None:
    """SQLite's ``max_page_count`` reached (SQLITE_FULL without root): a durable submit
    raises StoreUnavailable and is recorded not acknowledged, the store's health names
    the full database, the running job goes on, and all of it is written once the cap is
    lifted."""
    from trio_jobs import StoreUnavailable, run_jobs

    db = tmp_path / "jobs.db"
    release = trio.Event()

    async def work(job_id: str, payload: Any) -> None:
        i = 0
        while payload.get("long") and not release.is_set():
            narrate("tick", f"tick {i}", pad=PAD * 4)
            i += 1
            with trio.move_on_after(0.01):
                await release.wait()

    store = _CappedSQLiteStore(db)
    registry = JobRegistry(store=store)
    with trio.fail_after(CAP):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_jobs, registry, work)
            persister = persister_of(registry)
            assert persister is not None
            long_id = await registry.submit({"long": True})
            while registry.running < 1:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            conn = sqlite3.connect(db)
            store.max_pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.close()
            with trio.fail_after(5):
                while persister.health.error is None:
                    await trio.sleep(0.01)
            assert "database or disk is full" in persister.health.error
            with pytest.raises(StoreUnavailable):
                await registry.submit({})
            release.set()
            while registry.get(long_id).state is not JobState.COMPLETED:
                await trio.sleep(0.01)
            store.max_pages = None
            assert (await registry.wait(long_id)).state is JobState.COMPLETED
            assert persister.health.ok
            nursery.cancel_scope.cancel()
    narrated = registry.events(long_id)
    (refused,) = [r for r in registry.list_jobs() if r.id != long_id]
    async with SQLiteStore(db) as again:
        stored = await again.load_job(long_id)
        assert stored is not None and stored.record.state is JobState.COMPLETED
        assert await again.load_events(long_id) == narrated
        stored = await again.load_job(refused.id)
    assert stored is not None and stored.record.error == (
        "not acknowledged: the store was unavailable"
    )
