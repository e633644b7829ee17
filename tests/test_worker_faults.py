"""Workers that fail while they serve, as real processes: client -> queen -> hive -> worker.

SIGSTOP (a hung worker), SIGKILL (a dead one), SIGTERM (a stopping one), a worker that
answers heartbeats but whose stream goes mute, and OpenAI-backend workers whose upstream is
down. One queen (heartbeat TTL 2 s) and one hive (heartbeats every 0.2 s, SIGKILL grace 3 s)
serve the module; each test spawns the workers it needs under a model name of its own and
checks that nothing is left running. Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from servers.worker import WorkerConfig, build_app
from tests.daemons import Cluster, closed_port, collect, spawn_worker, wait_idle, wait_pid_gone
from trio_jobs import NarrationEvent, TerminalSignal
from trio_jobs._client import JobClient
from trio_jobs.http import serve

TTL_S = 2.0
GRACE_S = 0.5  # the queen's lost_worker_grace_s (its default)


@dataclass
class Env:
    queen: str
    hive: str
    cluster: Cluster
    root: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("faults")
    cluster = Cluster(root)
    try:
        hive = cluster.start(
            "hive",
            [
                *("hive", "--port", "0", "--models-dir", str(root / "models")),
                *("--heartbeat-s", "0.2", "--worker-grace", "3"),
            ],
        )
        queen = cluster.start(
            "queen",
            [
                *("queen", "--port", "0", "--hive", f"localhost={hive}"),
                *("--schedule-wait", "1.5", "--heartbeat-ttl", f"{TTL_S:g}"),
            ],
        )
        yield Env(queen, hive, cluster, root)
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0, "hive": 0}, codes


def _tokens(events: list[NarrationEvent]) -> list[str]:
    return [str(e.fields["token"]) for e in events if e.action == "token"]


async def _delete(client: JobClient, worker: dict[str, Any]) -> None:
    _, _, terminal = await collect(client, {"operation": "worker_delete", "id": worker["id"]})
    assert terminal is not None and terminal.wire == "[DONE]", terminal
    await wait_pid_gone(worker["pid"])


async def _follow(
    client: JobClient, job_id: str, on_event: Any
) -> tuple[list[NarrationEvent], TerminalSignal | None]:
    """Read a job's stream to its end, calling ``await on_event(event)`` for each event."""
    events: list[NarrationEvent] = []
    terminal: TerminalSignal | None = None
    async with client.stream(job_id) as stream:
        async for item in stream:
            if isinstance(item, NarrationEvent):
                events.append(item)
                await on_event(item)
            else:
                assert terminal is None, "a second terminal signal"
                terminal = item
    return events, terminal


async def test_a_hung_worker_fails_its_job_within_ttl_and_grace(env: Env) -> None:
    """SIGSTOP mid-infer: the job ends ``[ERROR] lost worker <id>`` within TTL + grace,
    without waiting for the worker; after SIGCONT the orphaned worker job is cancelled."""
    with trio.fail_after(30):
        async with JobClient(env.queen) as client:
            worker = await spawn_worker(client, "hung", token_delay_s=0.05)
            body = {"operation": "infer", "model": "hung", "prompt": "p", "max_tokens": 2000}
            job_id = await client.submit(body, timeout_s=60)
            stopped_at = 0.0

            async def on_event(event: NarrationEvent) -> None:
                nonlocal stopped_at
                if event.action == "token" and event.fields["index"] == 2:
                    os.kill(worker["pid"], signal.SIGSTOP)
                    stopped_at = time.monotonic()

            try:
                _, terminal = await _follow(client, job_id, on_event)
                took = time.monotonic() - stopped_at
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
            assert terminal is not None
            assert terminal.wire.startswith(f"[ERROR] lost worker {worker['id']} at ")
            assert f"no heartbeat for over {TTL_S:g}s" in terminal.wire
            assert 1.0 < took < TTL_S + GRACE_S + 1.0, took
            assert (await client.get(job_id))["state"] == "failed"
            # Woken up, the worker finds its stream gone and cancels the job (on_disconnect).
            await wait_idle(env.queen, worker["url"], within_s=10)
            await _delete(client, worker)


async def test_a_hung_worker_job_is_retried_on_another_worker(env: Env) -> None:
    """With a retry policy, the job of a worker that stops heartbeating runs again on the
    other live worker of its model and completes."""
    with trio.fail_after(40):
        async with JobClient(env.queen) as client:
            first = await spawn_worker(client, "twin", token_delay_s=0.05)
            second = await spawn_worker(client, "twin", token_delay_s=0.01)
            by_id = {first["id"]: first, second["id"]: second}
            body = {"operation": "infer", "model": "twin", "prompt": "q", "max_tokens": 60}
            retry = {"max_attempts": 2, "backoff_base": 0.0}
            job_id = await client.submit(body, timeout_s=60, retry=retry)
            stopped: dict[str, Any] = {}

            async def on_event(event: NarrationEvent) -> None:
                if event.action == "infer_worker" and not stopped:
                    stopped.update(by_id[event.fields["worker_id"]])
                if event.action == "token" and event.fields["index"] == 2 and "sent" not in stopped:
                    stopped["sent"] = True
                    os.kill(stopped["pid"], signal.SIGSTOP)

            try:
                events, terminal = await _follow(client, job_id, on_event)
            finally:
                os.kill(stopped["pid"], signal.SIGCONT)
            assert terminal is not None and terminal.wire == "[DONE]", terminal
            picks = [e.fields["worker_id"] for e in events if e.action == "infer_worker"]
            other = second if stopped["id"] == first["id"] else first
            assert picks == [stopped["id"], other["id"]]
            retry_event = next(e for e in events if e.action == "retry")
            assert f"lost worker {stopped['id']}" in retry_event.human
            assert events[-1].action == "infer_complete" and events[-1].fields["tokens"] == 60
            record = await client.get(job_id)
            assert (record["state"], record["attempts"]) == ("completed", 2)
            await wait_idle(env.queen, first["url"], second["url"], within_s=10)
            await _delete(client, first)
            await _delete(client, second)


async def test_killing_the_picked_worker_fails_over_to_the_other(env: Env) -> None:
    """Two idle workers; SIGKILL the one the scheduler picks (the lowest id) just before
    ``infer``: the request never reached it, so it runs on the other; the dead one is not
    picked again."""
    with trio.fail_after(40):
        async with JobClient(env.queen) as client:
            workers = [await spawn_worker(client, "pair"), await spawn_worker(client, "pair")]
            doomed, survivor = sorted(workers, key=lambda w: str(w["id"]))
            os.kill(doomed["pid"], signal.SIGKILL)
            await wait_pid_gone(doomed["pid"])
            body = {"operation": "infer", "model": "pair", "prompt": "r", "max_tokens": 5}
            _, events, terminal = await collect(client, body, timeout_s=20)
            assert terminal is not None and terminal.wire == "[DONE]", terminal
            picks = [e.fields["worker_id"] for e in events if e.action == "infer_worker"]
            assert picks == [doomed["id"], survivor["id"]]
            failover = next(e for e in events if e.action == "infer_failover")
            assert failover.human.startswith(f"worker {doomed['id']} at {doomed['url']}")
            assert "unreachable" in failover.human
            assert len(_tokens(events)) == 5
            _, events, terminal = await collect(client, body, timeout_s=20)
            assert terminal is not None and terminal.wire == "[DONE]"
            picks = [e.fields["worker_id"] for e in events if e.action == "infer_worker"]
            assert picks == [survivor["id"]]
            await _delete(client, survivor)
            await collect(client, {"operation": "worker_delete", "id": doomed["id"]})


@pytest.mark.parametrize("how", ["sigterm", "sigterm-retry", "worker_delete"])
async def test_a_busy_worker_stopped_ends_its_job_with_one_signal(
    env: Env, nursery: trio.Nursery, how: str
) -> None:
    """SIGTERM (from an operator, or from the hive for ``worker_delete``) while a job
    streams: the worker stops taking jobs, ends the job with one ``[ERROR] worker shutting
    down`` after its grace (half the hive's: 1.5 s) and exits 0, never SIGKILLed. The
    queen job fails with that message, or with a retry policy and a second worker
    completes there."""
    model = f"stop-{how}"
    retrying = how == "sigterm-retry"
    with trio.fail_after(40):
        async with JobClient(env.queen) as client:
            workers = [await spawn_worker(client, model, token_delay_s=0.02)]
            if retrying:
                workers.append(await spawn_worker(client, model, token_delay_s=0.02))
            by_id = {w["id"]: w for w in workers}
            body = {"operation": "infer", "model": model, "prompt": "s", "max_tokens": 150}
            retry = {"max_attempts": 2, "backoff_base": 0.0} if retrying else None
            job_id = await client.submit(body, timeout_s=60, retry=retry)
            picked: list[dict[str, Any]] = []
            signalled_at = 0.0
            deleted: list[NarrationEvent] = []

            async def delete(worker_id: str) -> None:
                _, events, _ = await collect(
                    client, {"operation": "worker_delete", "id": worker_id}
                )
                deleted.extend(events)

            async def on_event(event: NarrationEvent) -> None:
                nonlocal signalled_at
                if event.action == "infer_worker":
                    picked.append(by_id[event.fields["worker_id"]])
                if event.action == "token" and event.fields["index"] == 2 and not signalled_at:
                    signalled_at = time.time()
                    if how == "worker_delete":
                        nursery.start_soon(delete, picked[0]["id"])
                    else:
                        os.kill(picked[0]["pid"], signal.SIGTERM)

            events, terminal = await _follow(client, job_id, on_event)
            stopped = picked[0]
            assert terminal is not None
            if not retrying:
                assert terminal.wire.startswith("[ERROR] worker shutting down: "), terminal
                assert stopped["id"] in terminal.wire
                assert len(picked) == 1
            else:
                assert terminal.wire == "[DONE]", terminal
                other = workers[1 - workers.index(stopped)]
                assert [w["id"] for w in picked] == [stopped["id"], other["id"]]
                retry_event = next(e for e in events if e.action == "retry")
                assert "worker shutting down" in retry_event.human
                assert events[-1].fields["tokens"] == 150
            await wait_pid_gone(stopped["pid"], within_s=5)
            if how == "worker_delete":
                while not deleted:
                    await trio.sleep(0.05)
                record = deleted[-1].fields["worker"]
            else:
                query = {"operation": "worker_get", "id": stopped["id"]}
                _, got, _ = await collect(client, query)
                record = got[-1].fields["worker"]
                await collect(client, {"operation": "worker_delete", "id": stopped["id"]})
            assert (record["state"], record["returncode"]) == ("exited", 0)
            assert record["ended_at"] - signalled_at < 3.0  # within the hive's SIGKILL grace
            assert "SIGKILL" not in env.cluster.log("hive")
            await wait_idle(env.queen, within_s=5)
            for worker in workers:
                if worker is not stopped:
                    await _delete(client, worker)


async def test_a_stopping_worker_refuses_new_jobs_with_503(nursery: trio.Nursery) -> None:
    """While it stops, a worker answers ``POST /v1/jobs`` with 503 (no job is created, so
    a queen may send the request elsewhere) and ``/health`` says ``stopping``."""
    app, worker = build_app(WorkerConfig(worker_id="w-stop", model="tiny", stop_grace_s=5))
    url: str = await nursery.start(serve, app)
    body = {"operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 3}
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=url) as http:
            worker.stopping = True
            refused = await http.post("/v1/jobs", json=body)
            health = await http.get("/health")
    assert refused.status_code == 503
    assert refused.json() == {
        "error": "worker stopping",
        "detail": "worker w-stop is shutting down",
    }
    assert refused.headers["retry-after"] == "1"
    assert (health.status_code, health.json()["status"]) == (503, "stopping")
    assert worker.registry.list_jobs() == []


async def test_stop_ends_running_and_queued_jobs_with_one_error_each(
    nursery: trio.Nursery,
) -> None:
    """``Worker.stop`` past its grace: the running job and the one queued behind it (one
    slot) each end with exactly one ``[ERROR] worker shutting down``, and their streams
    are closed before ``stop`` returns."""
    config = WorkerConfig(
        worker_id="w-busy", model="tiny", token_delay_s=0.05, max_concurrent=1, stop_grace_s=0.3
    )
    app, worker = build_app(config)
    url: str = await nursery.start(serve, app)
    body = {"operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 1000}
    results: dict[str, TerminalSignal | None] = {}
    with trio.fail_after(10):
        async with JobClient(url) as client:
            ids = [await client.submit(body), await client.submit(body)]

            async def follow(job_id: str) -> None:
                _, results[job_id] = await _follow(client, job_id, _ignore)

            async with trio.open_nursery() as followers:
                for job_id in ids:
                    followers.start_soon(follow, job_id)
                while not worker.tokens_total:
                    await trio.sleep(0.01)
                started = trio.current_time()
                await worker.stop()
                assert 0.3 <= trio.current_time() - started < 2.0
    for job_id in ids:
        terminal = results[job_id]
        assert terminal is not None
        assert terminal.wire.startswith("[ERROR] worker shutting down: w-busy stopped "), terminal
    assert [worker.registry.get(j).state.value for j in ids] == ["failed", "failed"]


async def _ignore(event: NarrationEvent) -> None:
    await trio.lowlevel.checkpoint()


# ---- a worker whose stream goes mute ------------------------------------------------------


class _MuteWorker:
    """Looks like a worker to the queen (it heartbeats, accepts ``POST /v1/jobs``) but its
    job stream sends the headers and then nothing at all, not even keep-alives."""

    def __init__(self) -> None:
        self.url = ""
        self.deleted = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            line = request.split(b"\r\n", 1)[0].decode()
            if line.startswith("POST /v1/jobs"):
                answer = json.dumps({"job_id": "job-mute", "sse_url": "/v1/jobs/job-mute/stream"})
                await stream.send_all(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(answer)}\r\nConnection: close\r\n\r\n".encode()
                    + answer.encode()
                )
            elif line.startswith("GET /v1/jobs/job-mute/stream"):
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                await trio.sleep_forever()
            elif line.startswith("DELETE /v1/jobs/job-mute"):
                self.deleted.set()
                answer = json.dumps({"id": "job-mute", "state": "cancelled"})
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(answer)}\r\nConnection: close\r\n\r\n".encode()
                    + answer.encode()
                )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


async def _heartbeat_as(queen: str, worker_id: str, url: str, model: str) -> None:
    """Heartbeat to ``queen`` every 0.2 s for a fake worker at ``url``."""
    beat = {"worker_id": worker_id, "url": url, "model": model, "state": "ready"}
    async with httpx.AsyncClient() as http:
        while True:
            (await http.post(f"{queen}/v1/workers/heartbeat", json=beat)).raise_for_status()
            await trio.sleep(0.2)


@pytest.mark.parametrize("where", ["flag", "config"])
async def test_a_mute_stream_ends_the_job_after_the_silence_bound(
    nursery: trio.Nursery, tmp_path: Path, where: str
) -> None:
    """A worker that heartbeats but sends nothing on the job's stream: the job fails
    ``lost worker ...: no event or keep-alive for 1s`` (``--stream-silence 1``) and the
    queen cancels the job on the worker."""
    mute = _MuteWorker()
    await nursery.start(mute.run)
    cluster = Cluster(tmp_path)
    try:
        ghost = f"http://127.0.0.1:{closed_port()}"
        config = tmp_path / "queen.toml"
        config.write_text("[queen]\nstream_silence_s = 1\n")
        extra = ["--stream-silence", "1"] if where == "flag" else ["--config", str(config)]
        queen = cluster.start(
            "queen", ["queen", "--port", "0", "--hive", f"localhost={ghost}", *extra]
        )
        nursery.start_soon(_heartbeat_as, queen, "mute-1", mute.url, "mute")
        with trio.fail_after(15):
            async with JobClient(queen) as client:
                body = {"operation": "infer", "model": "mute", "prompt": "m", "max_tokens": 5}
                started = time.monotonic()
                _, events, terminal = await collect(client, body, timeout_s=30)
                took = time.monotonic() - started
                await mute.deleted.wait()
        assert terminal is not None
        assert terminal.wire == (
            f"[ERROR] lost worker mute-1 at {mute.url}: no event or keep-alive for 1s"
        )
        assert "forward" in [e.action for e in events]
        assert 1.0 <= took < 3.0, took
    finally:
        assert cluster.close() == {"queen": 0}


class _SlammingWorker:
    """Accepts a connection, reads the request and closes the socket without an answer."""

    def __init__(self) -> None:
        self.url = ""
        self.requests = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            if await stream.receive_some(65536):
                self.requests += 1

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


async def test_a_connection_reset_before_the_answer_fails_over(
    env: Env, nursery: trio.Nursery
) -> None:
    """The first pick closes the connection without answering (no job id came back): the
    request goes to the next live worker, and completes there."""
    slam = _SlammingWorker()
    await nursery.start(slam.run)
    nursery.start_soon(_heartbeat_as, env.queen, "a-slam", slam.url, "slam")
    config = WorkerConfig(worker_id="z-real", model="slam", queen_url=env.queen, heartbeat_s=0.2)
    app, worker = build_app(config)
    url: str = await nursery.start(serve, app)
    nursery.start_soon(worker.heartbeat_loop, url)
    nursery.start_soon(worker.readiness_loop, url)
    with trio.fail_after(15):
        async with httpx.AsyncClient() as http:
            while True:
                listed = (await http.get(f"{env.queen}/v1/workers")).json()["workers"]
                if {"a-slam", "z-real"} <= {w["worker_id"] for w in listed}:
                    break
                await trio.sleep(0.05)
        async with JobClient(env.queen) as client:
            body = {"operation": "infer", "model": "slam", "prompt": "t", "max_tokens": 4}
            _, events, terminal = await collect(client, body, timeout_s=10)
    assert terminal is not None and terminal.wire == "[DONE]", terminal
    picks = [e.fields["worker_id"] for e in events if e.action == "infer_worker"]
    assert picks == ["a-slam", "z-real"]
    failover = next(e for e in events if e.action == "infer_failover")
    assert failover.human.startswith(f"worker a-slam at {slam.url} is unreachable: ")
    assert slam.requests == 1
    assert len(_tokens(events)) == 4


@pytest.mark.parametrize("where", ["flag", "config"])
def test_stream_silence_must_be_positive(tmp_path: Path, where: str) -> None:
    """``--stream-silence`` / config ``stream_silence_s``: a bad value stops the queen with
    a message naming the key."""
    config = tmp_path / "queen.toml"
    config.write_text("[queen]\nstream_silence_s = 0\n")
    extra = ["--stream-silence", "0"] if where == "flag" else ["--config", str(config)]
    cluster = Cluster(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="stream_silence_s must be a positive number"):
            cluster.start("queen", ["queen", "--port", "0", *extra], 20)
    finally:
        cluster.close()


# ---- OpenAI-backend workers and their upstream ------------------------------------------


async def test_a_worker_with_a_dead_upstream_is_not_ready_until_it_answers(
    env: Env, nursery: trio.Nursery
) -> None:
    """The upstream is down: the worker comes up ``not_ready`` (heartbeat, ``/health``
    503 naming the URL), the queen schedules nothing on it; once the upstream answers the
    worker becomes ready and ``infer`` works through it."""
    port = closed_port()
    upstream = f"http://127.0.0.1:{port}"
    with trio.fail_after(40):
        async with JobClient(env.queen) as client:
            spawn = {
                "operation": "worker_spawn",
                "model": "far",
                "backend": "openai",
                "upstream_url": upstream,
            }
            _, events, terminal = await collect(client, spawn, timeout_s=30)
            assert terminal is not None and terminal.wire == "[DONE]", terminal
            worker = events[-1].fields["worker"]
            warning = next(e for e in events if e.action == "worker_not_ready")
            assert f"upstream {upstream} is unreachable: ConnectError" in warning.human
            async with httpx.AsyncClient() as http:
                health = await http.get(f"{worker['url']}/health")
                assert health.status_code == 503
                assert health.json()["state"] == "not_ready"
                assert health.json()["problem"].startswith(f"upstream {upstream} is unreachable")
                listed = (await http.get(f"{env.queen}/v1/workers")).json()["workers"]
                assert {w["worker_id"]: w["state"] for w in listed}[worker["id"]] == "not_ready"
            infer = {"operation": "infer", "model": "far", "prompt": "hi", "max_tokens": 3}
            _, _, terminal = await collect(client, infer)
            assert terminal is not None
            assert terminal.wire.startswith("[ERROR] no live worker serves model 'far'")
            assert f"{worker['id']} (far, not_ready)" in terminal.wire
            # Sent to the worker itself, the job fails naming the upstream.
            async with JobClient(worker["url"]) as direct:
                _, _, terminal = await collect(direct, infer)
            assert terminal is not None
            assert terminal.wire.startswith(f"[ERROR] upstream {upstream} is unreachable: ")
            # The upstream comes up (a tiny worker's OpenAI route on that port).
            app, _ = build_app(WorkerConfig(worker_id="upstream", model="far"))
            await nursery.start(partial(serve, app, port=port))
            async with httpx.AsyncClient() as http:
                while (await http.get(f"{worker['url']}/health")).status_code != 200:
                    await trio.sleep(0.05)
            _, events, terminal = await collect(client, infer)
            assert terminal is not None and terminal.wire == "[DONE]", terminal
            assert len(_tokens(events)) == 3
            await _delete(client, worker)


def test_daemon_logs_show_no_heartbeat_chatter(env: Env) -> None:
    """httpx request lines and heartbeats stay out of the INFO logs; workers joining do."""

    async def spawn() -> dict[str, Any]:
        async with JobClient(env.queen) as client:
            worker = await spawn_worker(client, "chatty")
            await trio.sleep(1.0)  # five heartbeats
            await _delete(client, worker)
            return worker

    worker = trio.run(spawn)
    queen, hive = env.cluster.log("queen"), env.cluster.log("hive")
    for log in (queen, hive):
        assert "HTTP Request:" not in log
        assert "/v1/workers/heartbeat" not in log
    assert f"worker {worker['id']} joined (ready): model chatty" in queen
