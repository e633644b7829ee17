"""The daemons as real processes on 127.0.0.1: client -> queen -> hive -> worker.

One hive and one queen serve the whole module (started once, stopped with SIGTERM at the
end, exit codes checked); tests spawn the workers they need through the queen. Every test
is bounded by ``trio.fail_after``; after each scenario the test checks that no job is left
running on any daemon involved.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from servers.worker import tiny_tokens
from tests.daemons import (
    Cluster,
    closed_port,
    collect,
    pid_alive,
    running_jobs,
    spawn_worker,
    wait_idle,
    wait_pid_gone,
)
from trio_jobs import HTTPStatusError, NarrationEvent, TerminalSignal
from trio_jobs._client import JobClient


@dataclass
class Env:
    queen: str
    hive: str
    ghost: str
    models: Path
    slow_worker: dict[str, Any]
    cluster: Cluster


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("daemons")
    models = root / "models"
    cluster = Cluster(root)
    worker_pid: int | None = None
    try:
        hive = cluster.start(
            "hive",
            [
                *("hive", "--port", "0", "--models-dir", str(models)),
                *("--heartbeat-s", "0.3", "--worker-grace", "3"),
            ],
        )
        ghost = f"http://127.0.0.1:{closed_port()}"
        queen = cluster.start(
            "queen",
            [
                *(
                    "queen",
                    "--port",
                    "0",
                    "--hive",
                    f"localhost={hive}",
                    "--hive",
                    f"ghost={ghost}",
                ),
                *("--schedule-wait", "1.5", "--heartbeat-ttl", "2"),
            ],
        )

        async def slow() -> dict[str, Any]:
            async with JobClient(queen) as client:
                return await spawn_worker(client, "slow", token_delay_s=0.05)

        slow_worker = trio.run(slow)
        worker_pid = slow_worker["pid"]
        yield Env(queen, hive, ghost, models, slow_worker, cluster)
    finally:
        codes = cluster.close()
    # SIGTERM stopped both daemons cleanly, and the hive took its workers with it.
    assert codes == {"queen": 0, "hive": 0}, codes
    assert worker_pid is None or not pid_alive(worker_pid)


def _tokens(events: list[NarrationEvent]) -> list[str]:
    return [str(e.fields["token"]) for e in events if e.action == "token"]


async def _remote_id(events: list[NarrationEvent]) -> str:
    forwards = [e for e in events if e.action == "forward"]
    assert forwards, [e.action for e in events]
    return str(forwards[-1].fields["remote_job_id"])


async def test_infer_streams_tokens_to_done(env: Env) -> None:
    with trio.fail_after(20):
        async with JobClient(env.queen) as client:
            await spawn_worker(client, "tiny")
            body = {"operation": "infer", "model": "tiny", "prompt": "hello trio", "max_tokens": 8}
            job_id, events, terminal = await collect(client, body, timeout_s=20)
            assert terminal is not None and terminal.wire == "[DONE]"
            expected = list(tiny_tokens("tiny", "hello trio", max_tokens=8))
            assert _tokens(events) == expected
            assert {e.actor for e in events if e.action == "token"} == {"worker"}
            actions = [e.action for e in events]
            assert actions[:3] == ["route_job", "infer_schedule", "infer_worker"]
            assert actions[-1] == "infer_complete"
            assert [e.id for e in events] == list(range(1, len(events) + 1))
            record = await client.get(job_id)
            assert record["state"] == "completed"


async def test_forwarded_failure_fails_the_queen_job(env: Env) -> None:
    with trio.fail_after(15):
        async with JobClient(env.queen) as client:
            body = {"operation": "worker_get", "hive_id": "localhost", "id": "worker-nope"}
            job_id, events, terminal = await collect(client, body)
            assert terminal is not None
            assert terminal.wire.startswith("[ERROR] unknown worker 'worker-nope'")
            assert (await client.get(job_id))["state"] == "failed"
            remote = await _remote_id(events)
        async with JobClient(env.hive) as hive:
            record = await hive.get(remote)
            assert record["state"] == "failed"
            assert record["error"] == terminal.message


async def test_timeout_is_enforced_on_both_sides(env: Env) -> None:
    worker_url = env.slow_worker["url"]
    with trio.fail_after(15):
        async with JobClient(env.queen) as client:
            body = {"operation": "infer", "model": "slow", "prompt": "x", "max_tokens": 2000}
            _, events, terminal = await collect(client, body, timeout_s=1.5)
            assert terminal is not None
            assert terminal.wire == "[ERROR] Job timed out after 1.5s"
            assert _tokens(events), "the worker streamed nothing before the timeout"
            remote = await _remote_id(events)
        await wait_idle(env.queen, env.hive, worker_url)
        async with JobClient(worker_url) as worker:
            record = await worker.get(remote)
        assert record["state"] in {"cancelled", "failed"}
        assert 0 < record["timeout_s"] <= 1.5


async def test_cancel_at_the_queen_cancels_the_worker_job(env: Env) -> None:
    worker_url = env.slow_worker["url"]
    with trio.fail_after(15):
        async with JobClient(env.queen) as client:
            body = {"operation": "infer", "model": "slow", "prompt": "y", "max_tokens": 2000}
            job_id = await client.submit(body, timeout_s=30)
            terminal: TerminalSignal | None = None
            remote = None
            async with client.stream(job_id) as stream:
                async for item in stream:
                    if isinstance(item, NarrationEvent):
                        if item.action == "forward":
                            remote = str(item.fields["remote_job_id"])
                        if item.action == "token" and item.fields["index"] == 2:
                            await client.cancel(job_id)
                    else:
                        terminal = item
            assert terminal is not None and terminal.wire == "[CANCELLED]"
            assert (await client.get(job_id))["state"] == "cancelled"
        assert remote is not None
        await wait_idle(env.queen, env.hive, worker_url)
        async with JobClient(worker_url) as worker:
            assert (await worker.get(remote))["state"] == "cancelled"


class _StallingServer:
    """Sends headers and part of a body, then stalls: a download that never finishes."""

    def __init__(self) -> None:
        self.url = ""
        self.requested = trio.Event()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            self.requested.set()
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000
            )
            await trio.sleep_forever()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


async def test_cancel_at_the_queen_cancels_the_hive_download(
    env: Env, nursery: trio.Nursery
) -> None:
    server = _StallingServer()
    await nursery.start(server.run)
    with trio.fail_after(15):
        async with JobClient(env.queen) as client:
            body = {"operation": "model_download", "model": "stall.bin", "url": server.url + "/m"}
            job_id = await client.submit(body, timeout_s=30)
            terminal: TerminalSignal | None = None
            events: list[NarrationEvent] = []
            async with client.stream(job_id) as stream:
                async for item in stream:
                    if isinstance(item, NarrationEvent):
                        events.append(item)
                        if item.action == "download_start":
                            await server.requested.wait()
                            while not (env.models / "stall.bin.part").exists():
                                await trio.sleep(0.02)
                            await client.cancel(job_id)
                    else:
                        terminal = item
            assert terminal is not None and terminal.wire == "[CANCELLED]"
            remote = await _remote_id(events)
        await wait_idle(env.queen, env.hive)
        async with JobClient(env.hive) as hive:
            assert (await hive.get(remote))["state"] == "cancelled"
    assert not (env.models / "stall.bin.part").exists()
    assert not (env.models / "stall.bin").exists()


async def test_worker_crash_mid_infer_is_an_error(env: Env) -> None:
    with trio.fail_after(20):
        async with JobClient(env.queen) as client:
            worker = await spawn_worker(client, "crashy", token_delay_s=0.05)
            body = {"operation": "infer", "model": "crashy", "prompt": "z", "max_tokens": 2000}
            job_id = await client.submit(body, timeout_s=30)
            terminal: TerminalSignal | None = None
            async with client.stream(job_id) as stream:
                async for item in stream:
                    if isinstance(item, NarrationEvent):
                        if item.action == "token" and item.fields["index"] == 1:
                            os.kill(worker["pid"], signal.SIGKILL)
                    else:
                        terminal = item
            assert terminal is not None and terminal.wire.startswith("[ERROR] lost worker ")
            assert worker["id"] in terminal.wire
            await wait_pid_gone(worker["pid"])
            # The hive noticed: the worker is listed as crashed.
            with trio.move_on_after(5):
                while True:
                    _, events, _ = await collect(
                        client, {"operation": "worker_get", "id": worker["id"]}
                    )
                    state = events[-1].fields["worker"]["state"]
                    if state == "crashed":
                        break
                    await trio.sleep(0.05)
            assert state == "crashed"
            # ... and the queen no longer schedules on it.
            again = {"operation": "infer", "model": "crashy", "prompt": "z", "max_tokens": 2}
            _, _, terminal = await collect(client, again)
            assert terminal is not None
            assert terminal.wire.startswith("[ERROR] no live worker serves model 'crashy'")
        await wait_idle(env.queen, env.hive)


async def test_hive_unreachable_is_a_clear_error(env: Env) -> None:
    with trio.fail_after(15):
        async with JobClient(env.queen) as client:
            _, _, terminal = await collect(client, {"operation": "worker_list", "hive_id": "ghost"})
    assert terminal is not None
    assert terminal.wire.startswith(f"[ERROR] hive 'ghost' at {env.ghost} is unreachable")


async def test_unknown_hive_names_the_known_ones(env: Env) -> None:
    with trio.fail_after(10):
        async with JobClient(env.queen) as client:
            _, _, terminal = await collect(client, {"operation": "model_list", "hive_id": "mars"})
    assert terminal is not None
    assert terminal.wire.startswith("[ERROR] unknown hive 'mars' (known hives: ghost, localhost")


async def test_invalid_operation_is_refused_with_the_field(env: Env) -> None:
    with trio.fail_after(10):
        async with JobClient(env.queen) as client:
            with pytest.raises(HTTPStatusError) as info:
                await client.submit({"operation": "infer", "model": "tiny"})
    assert info.value.status_code == 422
    assert "prompt" in str(info.value.detail)


async def test_status_shows_hives_and_workers(env: Env) -> None:
    with trio.fail_after(10):
        async with JobClient(env.queen) as client:
            _, events, terminal = await collect(client, {"operation": "status"})
    assert terminal is not None and terminal.wire == "[DONE]"
    status = next(e for e in events if e.action == "status")
    hives = {h["alias"]: h["reachable"] for h in status.fields["hives"]}
    assert (hives["localhost"], hives["ghost"]) == (True, False)
    models = {w["model"] for w in status.fields["workers"]}
    assert "slow" in models


async def test_worker_list_get_delete(env: Env) -> None:
    with trio.fail_after(20):
        async with JobClient(env.queen) as client:
            worker = await spawn_worker(client, "short-lived")
            assert worker["state"] == "ready" and worker["port"] and worker["pid"]
            _, events, _ = await collect(client, {"operation": "worker_list"})
            listed = {w["id"]: w for w in events[-1].fields["workers"]}
            assert listed[worker["id"]]["pid"] == worker["pid"]
            assert listed[worker["id"]]["model"] == "short-lived"
            body = {"operation": "worker_delete", "id": worker["id"]}
            _, events, terminal = await collect(client, body)
            assert terminal is not None and terminal.wire == "[DONE]"
            deleted = events[-1].fields["worker"]
            assert deleted["state"] == "exited" and deleted["returncode"] == 0
            await wait_pid_gone(worker["pid"])
            _, events, _ = await collect(client, {"operation": "worker_list"})
            assert worker["id"] not in {w["id"] for w in events[-1].fields["workers"]}


class _FileServer:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.url = ""

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(4096)
            await stream.send_all(
                f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + self.body
            )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)


async def test_model_download_list_get_delete_through_the_queen(
    env: Env, nursery: trio.Nursery
) -> None:
    body = os.urandom(300_000)
    digest = hashlib.sha256(body).hexdigest()
    server = _FileServer(body)
    await nursery.start(server.run)
    with trio.fail_after(20):
        async with JobClient(env.queen) as client:
            bad = {
                "operation": "model_download",
                "model": "bad.bin",
                "url": server.url,
                "sha256": "f" * 64,
            }
            _, _, terminal = await collect(client, bad)
            assert terminal is not None
            assert terminal.wire.startswith("[ERROR] sha256 mismatch for bad.bin")
            assert not list(env.models.glob("bad.bin*"))
            good = {
                "operation": "model_download",
                "model": "good.bin",
                "url": server.url,
                "sha256": digest,
            }
            _, events, terminal = await collect(client, good)
            assert terminal is not None and terminal.wire == "[DONE]"
            progress = [e.fields["progress"] for e in events if "progress" in e.fields]
            assert progress[-1] == {"done": len(body), "total": len(body), "unit": "bytes"}
            assert {e.actor for e in events if "progress" in e.fields} == {"hive"}
            _, events, _ = await collect(client, {"operation": "model_list"})
            assert "good.bin" in {m["id"] for m in events[-1].fields["models"]}
            _, events, _ = await collect(client, {"operation": "model_get", "id": "good.bin"})
            assert events[-1].fields["model"]["sha256"] == digest
            _, _, terminal = await collect(client, {"operation": "model_delete", "id": "good.bin"})
            assert terminal is not None and terminal.wire == "[DONE]"
            assert not (env.models / "good.bin").exists()
        await wait_idle(env.queen, env.hive)
        assert await running_jobs(env.queen) == []


@pytest.mark.parametrize("ending", ["cancel", "timeout"])
async def test_spawn_cut_short_leaves_no_worker_process(env: Env, ending: str) -> None:
    """keeper -> queen -> hive -> worker process: a spawn cancelled or timed out while the
    worker starts ends with the matching signal and the process does not survive."""
    with trio.fail_after(20):
        async with JobClient(env.queen) as client:
            body = {"operation": "worker_spawn", "model": f"cut-{ending}"}
            options: dict[str, Any] = {"timeout_s": 0.3} if ending == "timeout" else {}
            job_id = await client.submit(body, **options)
            pid = None
            terminal: TerminalSignal | None = None
            async with client.stream(job_id) as stream:
                async for item in stream:
                    if isinstance(item, NarrationEvent):
                        if item.action == "worker_process":
                            pid = int(item.fields["pid"])
                            if ending == "cancel":
                                await client.cancel(job_id)
                    else:
                        terminal = item
            assert terminal is not None
            expected = "[CANCELLED]" if ending == "cancel" else "[ERROR] Job timed out after 0.3s"
            assert terminal.wire == expected
            # A worker never starts in 0.3 s; on a slow machine the timeout may even fire
            # before the process exists (then there is nothing to leak).
            assert pid is not None or ending == "timeout"
            if pid is not None:
                await wait_pid_gone(pid)
            await wait_idle(env.queen, env.hive)
            _, events, _ = await collect(client, {"operation": "worker_list"})
            models = {w["model"] for w in events[-1].fields["workers"]}
            assert f"cut-{ending}" not in models


async def test_hive_start_and_stop_a_local_hive(env: Env) -> None:
    """hive_start runs a loopback hive as the queen's child; hive_stop stops only that one."""
    url = f"http://127.0.0.1:{closed_port()}"
    with trio.fail_after(30):
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{env.queen}/v1/hives", json={"alias": "spare", "url": url})
            assert answer.status_code == 200
        async with JobClient(env.queen) as client:
            _, _, terminal = await collect(client, {"operation": "hive_start", "alias": "spare"})
            assert terminal is not None and terminal.wire == "[DONE]"
            _, events, terminal = await collect(
                client, {"operation": "hive_status", "alias": "spare"}
            )
            assert terminal is not None and terminal.wire == "[DONE]"
            assert events[-1].fields["hive"]["reachable"] is True
            _, events, terminal = await collect(
                client, {"operation": "hive_stop", "alias": "spare"}
            )
            assert terminal is not None and terminal.wire == "[DONE]"
            assert events[-1].human == "hive spare stopped (exit code 0)"
            _, _, terminal = await collect(client, {"operation": "hive_status", "alias": "spare"})
            assert terminal is not None
            assert terminal.wire.startswith(f"[ERROR] hive 'spare' at {url} is unreachable")
            _, _, terminal = await collect(client, {"operation": "hive_stop", "alias": "localhost"})
            assert terminal is not None
            assert terminal.wire.startswith("[ERROR] not supported: hive_stop of 'localhost'")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_a_stopped_queen_leaves_no_hive_job_running(
    env: Env, nursery: trio.Nursery, tmp_path: Path, how: str
) -> None:
    """A queen stopped with SIGTERM cancels its forwarded jobs (DELETE); one killed with
    SIGKILL runs no cleanup, and the hive cancels the job when the stream drops."""
    server = _StallingServer()
    await nursery.start(server.run)
    cluster = Cluster(tmp_path)
    try:
        queen = cluster.start("queen2", ["queen", "--port", "0", "--hive", f"localhost={env.hive}"])
        with trio.fail_after(20):
            async with JobClient(queen) as client:
                body = {"operation": "model_download", "model": f"o-{how}", "url": server.url}
                job_id = await client.submit(body)
                remote = None
                async with client.stream(job_id) as stream:
                    async for item in stream:
                        if isinstance(item, NarrationEvent) and item.action == "forward":
                            remote = str(item.fields["remote_job_id"])
                        if isinstance(item, NarrationEvent) and item.action == "download_start":
                            break
            assert remote is not None
            await server.requested.wait()
            queen_process = cluster.procs[0][1]
            queen_process.send_signal(getattr(signal, how))
            code = await trio.to_thread.run_sync(queen_process.wait, 10)
            assert code == (0 if how == "SIGTERM" else -signal.SIGKILL)
            await wait_idle(env.hive, within_s=10)
            async with JobClient(env.hive) as hive:
                assert (await hive.get(remote))["state"] == "cancelled"
        assert not list(env.models.glob(f"o-{how}*"))
    finally:
        cluster.close()


async def test_worker_with_an_openai_upstream_through_the_chain(env: Env) -> None:
    """worker_spawn --backend openai: the hive starts a worker that streams its tokens from
    an OpenAI-compatible server (here the slow tiny worker's /v1/chat/completions)."""
    upstream = env.slow_worker["url"]
    with trio.fail_after(20):
        async with JobClient(env.queen) as client:
            body = {
                "operation": "worker_spawn",
                "model": "proxied",
                "backend": "openai",
                "upstream_url": upstream,
            }
            _, events, terminal = await collect(client, body)
            assert terminal is not None and terminal.wire == "[DONE]", terminal
            worker = events[-1].fields["worker"]
            assert worker["backend"] == "openai"
            infer = {"operation": "infer", "model": "proxied", "prompt": "up", "max_tokens": 4}
            _, events, terminal = await collect(client, infer)
            assert terminal is not None and terminal.wire == "[DONE]"
            assert _tokens(events) == list(tiny_tokens("proxied", "up", max_tokens=4))
            start = next(e for e in events if e.action == "infer_start")
            assert start.fields["backend"] == "openai"
            await collect(client, {"operation": "worker_delete", "id": worker["id"]})
        await wait_pid_gone(worker["pid"])


async def test_queen_routes_reject_bad_bodies_with_json_errors(env: Env) -> None:
    """The queen's own routes answer like the job endpoints: 400/415/422 JSON, nothing kept."""
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=env.queen) as http:
            for path in ("/v1/workers/heartbeat", "/v1/hives"):
                as_text = await http.post(
                    path, content=b"{}", headers={"Content-Type": "text/plain"}
                )
                assert as_text.status_code == 415
                assert as_text.json()["error"] == "unsupported media type"
                json_type = {"Content-Type": "application/json"}
                bad = await http.post(path, content=b"{not json", headers=json_type)
                assert bad.status_code == 400
                assert bad.json()["error"] == "malformed JSON"
                wrong = await http.post(path, json={"nothing": "useful"})
                assert wrong.status_code == 422
                assert wrong.json()["detail"][0]["loc"]
            hives = (await http.get("/v1/hives")).json()["hives"]
            assert all(h.get("alias") != "nothing" for h in hives)
