"""``DELETE /v1/jobs/{id}`` answered by the ASGI fast path, through real sockets: the same
answers as the Quart route, and Quart keeps every request the fast path cannot answer
exactly as the route would (a body, other request hooks, another path)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
import quart
import trio
from quart_trio import QuartTrio

from trio_jobs import JobRegistry, JobState, narrate
from trio_jobs.http import JobService, create_app, job_service, jobs_blueprint, serve

CAP = 10.0


async def hold(job_id: str, payload: Any) -> None:
    """Narrate once, then run until cancelled (or end at once with ``{"quick": true}``)."""
    narrate("start", "holding")
    if not payload.get("quick"):
        await trio.sleep_forever()


@asynccontextmanager
async def running(app: QuartTrio) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve, app)
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
            yield client
        nursery.cancel_scope.cancel()


@contextmanager
def quart_requests(app: QuartTrio) -> Iterator[list[str]]:
    """The ``METHOD path`` of every request Quart itself handles while inside."""
    seen: list[str] = []

    async def started(sender: Any, **extra: Any) -> None:
        seen.append(f"{quart.request.method} {quart.request.path}")

    quart.request_started.connect(started, app)
    try:
        yield seen
    finally:
        quart.request_started.disconnect(started, app)


async def running_job(client: httpx.AsyncClient, registry: JobRegistry, **body: Any) -> str:
    job_id: str = (await client.post("/v1/jobs", json=body)).json()["job_id"]
    while registry.get(job_id).state is not JobState.RUNNING:
        await trio.sleep(0.001)
    return job_id


async def answers(client: httpx.AsyncClient, registry: JobRegistry) -> list[Any]:
    """One of each DELETE answer, reduced to what must not depend on the path taken."""
    held = await running_job(client, registry)
    done = (await client.post("/v1/jobs", json={"quick": True})).json()["job_id"]
    await registry.wait(done)
    out: list[Any] = []
    for job_id in (held, held, done, "nope", "nope%2Fslash"):
        response = await client.delete(f"/v1/jobs/{job_id}")
        body = response.json()
        if response.status_code == 200:
            body = {key: body[key] for key in ("job_id", "state")} | {"id": body["job_id"] == held}
            del body["job_id"]
        out.append((response.status_code, response.headers["content-type"], body))
    return out


async def test_fast_path_answers_as_the_quart_route() -> None:
    plain_registry, hooked_registry = JobRegistry(), JobRegistry()
    plain = create_app(plain_registry, hold)
    hooked = create_app(hooked_registry, hold)
    hook_calls: list[str] = []

    @hooked.before_request
    async def count() -> None:
        hook_calls.append(quart.request.method)

    with trio.fail_after(CAP):
        async with running(plain) as client, running(hooked) as hooked_client:
            plain_service, hooked_service = job_service(plain), job_service(hooked)
            assert plain_service is not None and hooked_service is not None
            assert plain_service.fast_paths and not hooked_service.fast_paths
            with quart_requests(plain) as seen:
                fast = await answers(client, plain_registry)
            slow = await answers(hooked_client, hooked_registry)
    assert fast == slow
    assert [status for status, _, _ in fast] == [200, 409, 409, 404, 404]
    assert fast[0][2] == {"state": "cancelled", "id": True}
    assert fast[1][2] == {"error": "conflict", "detail": "the job is already cancelled"}
    assert fast[2][2] == {"error": "conflict", "detail": "the job is already completed"}
    assert fast[3][2] == {"error": "not found", "detail": "unknown job: nope"}
    # Quart handled the POSTs and the id with a slash; the fast path the other DELETEs.
    assert [line for line in seen if line.startswith("DELETE")] == ["DELETE /v1/jobs/nope/slash"]
    assert hook_calls.count("DELETE") == 5


async def test_fast_path_auth_matches_the_route() -> None:
    registry = JobRegistry()
    app = create_app(registry, hold, token="s3cret")
    good = {"Authorization": "Bearer s3cret"}
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = (await client.post("/v1/jobs", json={}, headers=good)).json()["job_id"]
            with quart_requests(app) as seen:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    refused = await client.delete(f"/v1/jobs/{job_id}", headers=headers)
                    assert refused.status_code == 401
                    assert refused.json()["error"] == "unauthorized"
                    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="trio-jobs"'
                assert registry.get(job_id).state is not JobState.CANCELLED
                accepted = await client.delete(f"/v1/jobs/{job_id}", headers=good)
            assert seen == []
    assert accepted.status_code == 200
    assert accepted.json()["state"] == "cancelled"


async def test_a_delete_with_a_body_goes_through_quart() -> None:
    registry = JobRegistry()
    app = create_app(registry, hold)
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = await running_job(client, registry)
            with quart_requests(app) as seen:
                response = await client.request("DELETE", f"/v1/jobs/{job_id}", content=b"{}")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert seen == [f"DELETE /v1/jobs/{job_id}"]


async def test_fast_path_follows_the_blueprint_prefix() -> None:
    registry = JobRegistry()
    app = QuartTrio("daemon")
    app.register_blueprint(jobs_blueprint(registry, hold), url_prefix="/api")
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = (await client.post("/api/v1/jobs", json={})).json()["job_id"]
            while registry.get(job_id).state is not JobState.RUNNING:
                await trio.sleep(0.001)
            with quart_requests(app) as seen:
                outside = await client.delete(f"/v1/jobs/{job_id}")
                inside = await client.delete(f"/api/v1/jobs/{job_id}")
    assert outside.status_code == 404
    assert outside.json()["error"] == "not found"
    assert inside.status_code == 200
    assert inside.json()["state"] == "cancelled"
    assert seen == [f"DELETE /v1/jobs/{job_id}"]


async def test_concurrent_deletes_cancel_once() -> None:
    registry = JobRegistry()
    app = create_app(registry, hold)
    statuses: list[int] = []
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = await running_job(client, registry)

            async def delete() -> None:
                statuses.append((await client.delete(f"/v1/jobs/{job_id}")).status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(delete)
    assert sorted(statuses) == [200, 409, 409, 409]
    assert [h.state for h in registry.history(job_id)].count(JobState.CANCELLED) == 1


async def test_fast_path_turns_an_unexpected_error_into_a_json_500(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = JobRegistry()
    app = create_app(registry, hold)

    async def broken(self: JobService, job_id: str) -> dict[str, Any]:
        raise RuntimeError("boom")

    monkeypatch.setattr(JobService, "cancel", broken)
    with trio.fail_after(CAP), caplog.at_level(logging.ERROR, "trio_jobs.http"):
        async with running(app) as client:
            response = await client.delete("/v1/jobs/anything")
            assert (await client.get("/health")).status_code == 200
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error", "detail": "RuntimeError"}
    assert "unhandled error" in caplog.text


async def test_fast_path_is_off_outside_serving() -> None:
    """Quart's in-process test client, without the app's serving hooks, uses the route."""
    registry = JobRegistry()
    app = create_app(registry, hold)
    service = job_service(app)
    assert service is not None and not service.fast_paths
    response = await app.test_client().delete("/v1/jobs/nope")
    assert response.status_code == 404
    assert await response.get_json() == {"error": "not found", "detail": "unknown job: nope"}
