"""``forward_job`` against a daemon app on a real socket: which connections it uses.

The daemon is a job app (``create_app``) served by hypercorn on 127.0.0.1; an ASGI
wrapper records each request's method, path and client port (one port per TCP
connection). The queen side is a plain registry whose jobs forward to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from servers.queen import _forward
from servers.queen._forward import forward_job
from trio_jobs import JobClient, JobRegistry, JobState, narrate, open_job_runner
from trio_jobs.http import create_app, serve


class Recorder:
    """ASGI middleware: ``(method, path, client port)`` of every HTTP request."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests: list[tuple[str, str, int]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests.append((scope["method"], scope["path"], scope["client"][1]))
        await self.inner(scope, receive, send)

    def ports(self, method: str) -> list[int]:
        return [port for m, _, port in self.requests if m == method]


async def _hold(job_id: str, payload: Any) -> None:
    narrate("held", "holding")
    if payload.get("hold"):
        await trio.sleep_forever()


async def _follow(url: str, job_id: str, watched: trio.Event) -> None:
    async with JobClient(url) as client, client.stream(job_id) as stream:
        async for _ in stream:
            watched.set()


def _daemon_app() -> tuple[JobRegistry, Any, Recorder]:
    registry = JobRegistry()
    app = create_app(registry, _hold)
    recorder = Recorder(app.asgi_app)
    app.asgi_app = recorder  # type: ignore[method-assign]
    return registry, app, recorder


def _pools() -> dict[str, Any]:
    try:
        return _forward._daemons.get()
    except LookupError:
        return {}


@asynccontextmanager
async def _forwarding(
    app: Any, body: dict[str, Any], then: Callable[[str], None] | None = None
) -> AsyncIterator[tuple[str, JobRegistry]]:
    """The daemon ``app`` on a real socket, and a queen registry whose jobs forward
    ``body`` to it (``then(url)`` runs after each forward)."""
    queen = JobRegistry()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, app)

        async def forward(job_id: str, payload: Any) -> None:
            await forward_job(queen, url, body, what="daemon")
            if then is not None:
                then(url)

        async with open_job_runner(queen, forward):
            yield url, queen
        nursery.cancel_scope.cancel()


async def test_a_cancel_goes_out_at_once_on_a_kept_connection() -> None:
    """While the job's stream holds its connection, a spare one is kept open: the DELETE
    that cancels the remote job is sent on it (no connect on a cancel's path) and the
    remote job ends CANCELLED by it. (Another client follows the remote job, so the
    queen's stream closing is not its last one leaving, which cancels it too.)"""
    remote, app, recorder = _daemon_app()
    with trio.fail_after(10):
        async with _forwarding(app, {"hold": True}) as (url, queen), trio.open_nursery() as nursery:
            job_id = queen.create_job({})
            while not (remote.running and recorder.ports("HEAD")):
                await trio.sleep(0.005)
            [remote_id] = [r.id for r in remote.list_jobs()]
            watched = trio.Event()
            nursery.start_soon(_follow, url, remote_id, watched)
            await watched.wait()
            [stream_port] = recorder.ports("POST")
            spare = recorder.ports("HEAD")
            assert stream_port not in spare
            assert queen.cancel_job(job_id)
            assert (await queen.wait(job_id)).state is JobState.CANCELLED
            [delete] = [r for r in recorder.requests if r[0] == "DELETE"]
            assert delete[1].endswith(remote_id)
            assert delete[2] in spare
            assert remote.get(remote_id).state is JobState.CANCELLED
            history = remote.history(remote_id)
            assert history[-1].reason == "cancelled over HTTP"  # not the stream's drop
            nursery.cancel_scope.cancel()


async def test_the_spare_connection_is_reused_while_streams_stay_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spare is refreshed on the same connection (one ``HEAD`` at a time, on a kept
    one), not a connection per refresh."""
    monkeypatch.setattr(_forward, "_SPARE_REFRESH_S", 0.02)
    _, app, recorder = _daemon_app()
    with trio.fail_after(10):
        async with _forwarding(app, {"hold": True}) as (_, queen):
            job_id = queen.create_job({})
            while len(recorder.ports("HEAD")) < 10:
                await trio.sleep(0.005)
            queen.cancel_job(job_id)
    assert len(set(recorder.ports("HEAD"))) == 1


async def test_a_daemon_unused_for_a_while_is_dropped_with_its_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon's pool lives while forwards use it and is dropped (its connections
    closed) once none has for ``_DROP_AFTER_S``; the next forward makes a new one."""
    monkeypatch.setattr(_forward, "_DROP_AFTER_S", 0.05)
    _, app, recorder = _daemon_app()
    seen: list[bool] = []
    with trio.fail_after(10):
        async with _forwarding(app, {}, lambda url: seen.append(url in _pools())) as (
            url,
            queen,
        ):
            for _ in range(2):
                job_id = queen.create_job({})
                assert (await queen.wait(job_id)).state is JobState.COMPLETED
                assert seen.pop() is True
                while url in _pools():
                    await trio.sleep(0.01)
    assert len(recorder.ports("POST")) == 2
    assert len(set(recorder.ports("POST"))) == 2  # the first pool's was closed


async def test_jobs_forwarded_one_after_another_send_no_spare_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Short jobs give their connection back before the look after their stream opened:
    an idle connection is there, so no ``HEAD`` is sent on the next job's path (only the
    first stream's, and the periodic refresh, which this test pushes out of the way)."""
    monkeypatch.setattr(_forward, "_SPARE_AFTER_OPEN_S", 0.005)
    monkeypatch.setattr(_forward, "_SPARE_REFRESH_S", 60.0)
    _, app, recorder = _daemon_app()
    with trio.fail_after(10):
        async with _forwarding(app, {}) as (_, queen):
            for _ in range(20):
                job_id = queen.create_job({})
                assert (await queen.wait(job_id)).state is JobState.COMPLETED
                await trio.sleep(0.01)  # past the look after this stream opened
    assert len(recorder.ports("POST")) == 20
    assert len(recorder.ports("HEAD")) <= 1
    assert len(set(recorder.ports("POST"))) <= 2  # the pool's kept connections
