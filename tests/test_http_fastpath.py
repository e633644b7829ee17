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
from trio_jobs.http import ApiError, JobService, create_app, job_service, jobs_blueprint, serve

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
def quart_requests(app: QuartTrio, endpoint: str = "trio_jobs.cancel_job") -> Iterator[list[str]]:
    """The ``METHOD path`` of every request Quart itself routes to the cancel view while
    inside (a view is not something the fast path checks for, unlike hooks or signals)."""
    seen: list[str] = []
    view = app.view_functions[endpoint]

    async def recording(**kwargs: Any) -> Any:
        seen.append(f"{quart.request.method} {quart.request.path}")
        return await view(**kwargs)

    app.view_functions[endpoint] = recording
    try:
        yield seen
    finally:
        app.view_functions[endpoint] = view


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
            with quart_requests(plain) as seen, quart_requests(hooked) as seen_hooked:
                fast = await answers(client, plain_registry)
                slow = await answers(hooked_client, hooked_registry)
    assert fast == slow
    assert [status for status, _, _ in fast] == [200, 409, 409, 404, 404]
    assert fast[0][2] == {"state": "cancelled", "id": True}
    assert fast[1][2] == {"error": "conflict", "detail": "the job is already cancelled"}
    assert fast[2][2] == {"error": "conflict", "detail": "the job is already completed"}
    assert fast[3][2] == {"error": "not found", "detail": "unknown job: nope"}
    # The fast path answered every DELETE it could (Quart routed the id with a slash to
    # its own 404); with a hook of the app's own, Quart's route answered them all.
    assert seen == []
    assert len(seen_hooked) == 4
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


async def test_a_delete_with_a_body_or_a_foreign_origin_is_refused_before_either_path() -> None:
    """The cross-site rules stand in front of the fast path and of Quart alike."""
    registry = JobRegistry()
    app = create_app(registry, hold)
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = await running_job(client, registry)
            path = f"/v1/jobs/{job_id}"
            with quart_requests(app) as seen:
                with_body = await client.request(
                    "DELETE", path, content=b"{}", headers={"Content-Type": "application/json"}
                )
                as_text = await client.request(
                    "DELETE", path, headers={"Content-Type": "text/plain"}
                )
                foreign = await client.delete(path, headers={"Origin": "http://evil.example"})
                rebound = await client.delete(path, headers={"Host": "evil.example"})
            assert registry.get(job_id).state is JobState.RUNNING
            assert (await client.delete(path)).status_code == 200
    assert with_body.status_code == 400
    assert with_body.json() == {"error": "bad request", "detail": "a DELETE takes no body"}
    assert as_text.status_code == 415
    assert foreign.status_code == 403
    assert rebound.status_code == 421
    for refused in (with_body, as_text, foreign, rebound):
        assert refused.headers["content-type"] == "application/json"
        assert set(refused.json()) == {"error", "detail"}
    assert seen == []


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
    assert seen == []


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


# ---- whatever else the app would run sends the DELETE through Quart ------------------------


def gate_middleware(app: QuartTrio, calls: list[str]) -> None:
    """ASGI middleware installed before the blueprint: 403 without ``x-key``."""
    inner = app.asgi_app

    async def gate(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (b"x-key", b"1") not in scope["headers"]:
            calls.append("gate")
            body = b'{"error":"forbidden","detail":"no key"}'
            start = {"type": "http.response.start", "status": 403, "headers": []}
            await send(start)
            await send({"type": "http.response.body", "body": body})
            return
        await inner(scope, receive, send)

    app.asgi_app = gate  # type: ignore[method-assign]


def customize(kind: str, app: QuartTrio, calls: list[str]) -> None:
    if kind == "before_request added while starting":

        @app.before_serving
        async def late() -> None:
            @app.before_request
            async def audit() -> None:
                calls.append(quart.request.method)

    elif kind == "teardown_appcontext":

        @app.teardown_appcontext
        async def teardown(exc: BaseException | None) -> None:
            calls.append("teardown")

    elif kind == "error handler of the app's own":

        @app.errorhandler(ApiError)
        async def custom(error: ApiError) -> tuple[dict[str, str], int]:
            calls.append("handler")
            return {"error": "custom"}, error.status

    elif kind == "a DELETE route of the app's own":

        @app.delete("/v1/jobs/finished")
        async def purge() -> dict[str, int]:
            calls.append("purge")
            return {"purged": 0}

    elif kind == "a Quart signal receiver":

        async def started(sender: Any, **extra: Any) -> None:
            calls.append("signal")

        quart.request_started.connect(started, app, weak=False)
        calls.append("connected")


KINDS = [
    "before_request added while starting",
    "teardown_appcontext",
    "error handler of the app's own",
    "a DELETE route of the app's own",
    "a Quart signal receiver",
]


@pytest.mark.parametrize("kind", KINDS)
async def test_anything_else_the_app_runs_sends_delete_through_quart(kind: str) -> None:
    registry = JobRegistry()
    app = create_app(registry, hold)
    calls: list[str] = []
    customize(kind, app, calls)
    try:
        with trio.fail_after(CAP):
            async with running(app) as client:
                job_id = await running_job(client, registry)
                calls.clear()
                with quart_requests(app) as seen:
                    target = "finished" if kind.startswith("a DELETE route") else "nope"
                    other = await client.delete(f"/v1/jobs/{target}")
                    cancelled = await client.delete(f"/v1/jobs/{job_id}")
    finally:
        if kind == "a Quart signal receiver":
            quart.request_started.receivers.clear()
    assert cancelled.status_code == 200
    assert seen[-1] == f"DELETE /v1/jobs/{job_id}"
    expected = {
        "before_request added while starting": ["DELETE", "DELETE"],
        "teardown_appcontext": ["teardown"],
        "error handler of the app's own": ["handler"],
        "a DELETE route of the app's own": ["purge"],
        "a Quart signal receiver": ["signal", "signal"],
    }[kind]
    assert sorted(set(calls)) == sorted(set(expected))
    if kind == "a DELETE route of the app's own":
        assert other.json() == {"purged": 0}
    if kind == "error handler of the app's own":
        assert other.json() == {"error": "custom"}


async def test_middleware_installed_before_the_blueprint_is_not_bypassed() -> None:
    registry = JobRegistry()
    app = QuartTrio("gated")
    calls: list[str] = []
    gate_middleware(app, calls)
    app.register_blueprint(jobs_blueprint(registry, hold))
    key = {"x-key": "1"}
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = (await client.post("/v1/jobs", json={}, headers=key)).json()["job_id"]
            refused = await client.delete(f"/v1/jobs/{job_id}")
            accepted = await client.delete(f"/v1/jobs/{job_id}", headers=key)
    assert (refused.status_code, calls) == (403, ["gate"])
    assert accepted.status_code == 200


async def test_fast_path_under_quarts_test_harness() -> None:
    """Quart's test client sends no ``server`` in the scope: the loopback rules apply."""
    registry = JobRegistry()
    app = create_app(registry, hold)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        job_id = (await (await client.post("/v1/jobs", json={})).get_json())["job_id"]
        while registry.get(job_id).state is not JobState.RUNNING:
            await trio.sleep(0.001)
        with quart_requests(app) as seen:
            response = await client.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 200
        assert (await response.get_json())["state"] == "cancelled"
        assert seen == []


# ---- the other job routes: the same fast path, the same answers ---------------------------

VIEWS = ("submit_job", "stream_job", "get_job", "cancel_job")


@contextmanager
def quart_views(app: QuartTrio) -> Iterator[list[str]]:
    """The ``METHOD path`` of every request Quart routes to one of the four job views."""
    seen: list[str] = []
    saved = {name: app.view_functions[f"trio_jobs.{name}"] for name in VIEWS}

    def recording(view: Any) -> Any:
        async def wrapped(**kwargs: Any) -> Any:
            seen.append(f"{quart.request.method} {quart.request.path}")
            return await view(**kwargs)

        return wrapped

    for name, view in saved.items():
        app.view_functions[f"trio_jobs.{name}"] = recording(view)
    try:
        yield seen
    finally:
        app.view_functions.update({f"trio_jobs.{name}": view for name, view in saved.items()})


def _normal(response: httpx.Response) -> tuple[int, str | None, str]:
    """Status, content type and body, with what differs from job to job taken out."""
    import re

    text = re.sub(r"job-[0-9a-f-]{36}", "JOB", response.text)
    text = re.sub(r'"(ts|created_at|started_at|finished_at)":"[^"]*"', r'"\1":T', text)
    return response.status_code, response.headers.get("content-type"), text


async def every_route(client: httpx.AsyncClient, registry: JobRegistry) -> list[Any]:
    """One answer of each kind from the four routes, reduced to what must not depend on
    the path taken."""
    out = []
    created = await client.post("/v1/jobs", json={"quick": True})
    out.append(_normal(created))
    job_id = created.json()["job_id"]
    await registry.wait(job_id)
    assert created.headers["location"] == f"/v1/jobs/{job_id}"
    one_call = await client.post(
        "/v1/jobs", json={"quick": True}, headers={"Accept": "text/event-stream"}
    )
    out.append((_normal(one_call), one_call.headers["x-job-id"].startswith("job-")))
    for path, headers in (
        (f"/v1/jobs/{job_id}/stream", {}),
        (f"/v1/jobs/{job_id}/stream", {"Last-Event-ID": "1"}),
        (f"/v1/jobs/{job_id}/stream", {"Last-Event-ID": "2"}),
        (f"/v1/jobs/{job_id}/stream", {"Last-Event-ID": "x"}),
        ("/v1/jobs/nope/stream", {}),
        (f"/v1/jobs/{job_id}", {}),
        ("/v1/jobs/nope", {}),
    ):
        answer = await client.get(path, headers=headers)
        out.append((path.replace(job_id, "JOB"), headers, answer.status_code, _normal(answer)[2]))
    for body, headers in (
        (b'{"priority": "urgent"}', {"Content-Type": "application/json"}),
        (b"{nope", {"Content-Type": "application/json"}),
        (b"{}", {"Content-Type": "text/plain"}),
        (b"[1]", {"Content-Type": "application/json"}),
    ):
        answer = await client.post("/v1/jobs", content=body, headers=headers)
        out.append(_normal(answer))
    return out


async def test_every_job_route_answers_on_the_fast_path_as_through_quart() -> None:
    plain_registry, hooked_registry = JobRegistry(), JobRegistry()
    plain = create_app(plain_registry, hold)
    hooked = create_app(hooked_registry, hold)

    @hooked.before_request
    async def nothing() -> None:
        pass

    with trio.fail_after(CAP):
        async with running(plain) as client, running(hooked) as hooked_client:
            with quart_views(plain) as seen, quart_views(hooked) as seen_hooked:
                fast = await every_route(client, plain_registry)
                slow = await every_route(hooked_client, hooked_registry)
    assert fast == slow
    assert fast[0][0] == 201
    assert seen == []  # the fast path answered every one
    assert len(seen_hooked) == 12  # Quart answered every one (the 415 is refused before)


async def test_a_hook_added_while_serving_sends_the_routes_through_quart() -> None:
    """The fast path works out once which routes it may answer, and again after any
    Quart setup method (here a hook added after the first requests)."""
    registry = JobRegistry()
    app = create_app(registry, hold)
    calls: list[str] = []
    with trio.fail_after(CAP):
        async with running(app) as client:
            with quart_views(app) as seen:
                job_id = (await client.post("/v1/jobs", json={"quick": True})).json()["job_id"]
                assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
                assert seen == []

                @app.before_request
                async def audit() -> None:
                    calls.append(quart.request.method)

                assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 200
                assert (await client.post("/v1/jobs", json={"quick": True})).status_code == 201
    assert seen == [f"GET /v1/jobs/{job_id}", "POST /v1/jobs"]
    assert calls == ["GET", "POST"]


async def test_a_query_string_sends_the_stream_through_quart() -> None:
    registry = JobRegistry()
    app = create_app(registry, hold)
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = (await client.post("/v1/jobs", json={"quick": True})).json()["job_id"]
            await registry.wait(job_id)
            with quart_views(app) as seen:
                resumed = await client.get(
                    f"/v1/jobs/{job_id}/stream", params={"last_event_id": "1"}
                )
    assert resumed.status_code == 200
    assert resumed.text == "retry: 2000\nid: 2\ndata: [DONE]\n\n"
    assert seen == [f"GET /v1/jobs/{job_id}/stream"]


async def test_a_client_leaving_a_running_stream_on_the_fast_path_is_seen() -> None:
    """The fast path's stream watches for the client leaving while it waits: the stream
    is closed (and ``on_disconnect=cancel`` applied) as under Quart."""
    registry = JobRegistry()
    app = create_app(registry, hold)
    service = job_service(app)
    assert service is not None
    with trio.fail_after(CAP):
        async with running(app) as client:
            job_id = (await client.post("/v1/jobs", json={"on_disconnect": "cancel"})).json()[
                "job_id"
            ]
            host, port = str(client.base_url).removeprefix("http://").rstrip("/").split(":")
            sock = await trio.open_tcp_stream(host, int(port))
            async with sock:
                request = f"GET /v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: {host}\r\n\r\n"
                await sock.send_all(request.encode())
                seen = b""
                while b"data: {" not in seen:
                    seen += await sock.receive_some(65536)
                assert service.watchers(job_id) == 1
            while service.watchers(job_id):
                await trio.sleep(0.001)
            record = await registry.wait(job_id)
    assert record.state is JobState.CANCELLED
