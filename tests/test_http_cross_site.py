"""Cross-site rules, opt-in CORS, strict bodies, the end of a stream and ``on_disconnect``
from acceptance, through real sockets (hypercorn on 127.0.0.1 port 0, httpx and raw h11).

Every test runs under a ``trio.fail_after`` cap; waits on real sockets are bounded polls.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import quart
import trio

from trio_jobs import JobRegistry, JobState
from trio_jobs.http import SitePolicy, create_app

from .test_http_server import (
    CAP,
    RawStream,
    Server,
    data_frames,
    eventually,
    open_ws,
    start_server,
    submit,
    ws_handshake_rejection,
)

APP = "http://app.example:8080"
EVIL = "http://evil.example"


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    return await start_server(nursery)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(5, read=None)) as c:
        yield c


def _json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail"}
    return body


# ---- CORS ---------------------------------------------------------------------------------


async def test_nothing_is_cross_origin_by_default(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        plain = await client.get("/v1/jobs")
        assert plain.status_code == 200
        assert plain.headers["vary"] == "Origin"
        assert "access-control-allow-origin" not in plain.headers
        for method in ("GET", "POST", "OPTIONS"):
            headers = {"Origin": EVIL, "Access-Control-Request-Method": "POST"}
            if method == "POST":
                headers["Content-Type"] = "application/json"
            answer = await client.request(method, "/v1/jobs", headers=headers, content=b"{}")
            assert _json_error(answer, 403)["error"] == "forbidden"
            assert "access-control-allow-origin" not in answer.headers
        assert len(server.registry) == 0


async def test_allowed_origins_read_and_write_cross_origin(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery, cors_origins=[APP])
        async with httpx.AsyncClient(base_url=srv.url, headers={"Origin": APP}) as c:
            preflight = await c.options(
                "/v1/jobs",
                headers={
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type,authorization",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == APP
            assert {"POST", "DELETE", "GET"} <= {
                m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")
            }
            allowed = {
                h.strip().lower()
                for h in preflight.headers["access-control-allow-headers"].split(",")
            }
            assert {"last-event-id", "authorization", "content-type"} <= allowed
            assert int(preflight.headers["access-control-max-age"]) > 0
            assert preflight.headers["vary"] == "Origin"

            created = await c.post("/v1/jobs", json={"n": 2})
            assert created.status_code == 201
            assert created.headers["access-control-allow-origin"] == APP
            assert "Location" in created.headers["access-control-expose-headers"]
            job_id = created.json()["job_id"]
            await srv.registry.wait(job_id)
            async with c.stream("GET", f"/v1/jobs/{job_id}/stream") as stream:
                assert stream.headers["access-control-allow-origin"] == APP
                assert stream.headers["vary"] == "Origin"
                body = (await stream.aread()).decode()
            assert data_frames(body)[-1].data == "[DONE]"
            # Errors are readable by the allowed page too.
            missing = await c.get("/v1/jobs/job-nope")
            assert _json_error(missing, 404)
            assert missing.headers["access-control-allow-origin"] == APP
            # So is the DELETE fast path's answer.
            gone = await c.delete(f"/v1/jobs/{job_id}")
            assert _json_error(gone, 409)
            assert gone.headers["access-control-allow-origin"] == APP
        other = await _get(srv, "/v1/jobs", {"Origin": "http://app.example:8081"})
        assert _json_error(other, 403)
        assert "access-control-allow-origin" not in other.headers


async def _get(srv: Server, path: str, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=srv.url) as c:
        return await c.get(path, headers=headers)


async def test_the_servers_own_origin_passes(server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            own = await c.post("/v1/jobs", json={"n": 1}, headers={"Origin": server.url})
            assert own.status_code == 201
            assert "access-control-allow-origin" not in own.headers
            by_name = await c.get(
                "/v1/jobs",
                headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
            )
            assert by_name.status_code == 200
            for foreign in (
                f"http://127.0.0.1:{int(port) + 1}",
                f"https://127.0.0.1:{port}",
                "null",
            ):
                refused = await c.post("/v1/jobs", json={"n": 1}, headers={"Origin": foreign})
                assert _json_error(refused, 403)
        assert len(server.registry) == 1


# ---- content types ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=utf-16",
        "application/jsonx",
    ],
)
async def test_posts_that_are_not_json_are_415_and_create_nothing(
    server: Server, client: httpx.AsyncClient, content_type: str | None
) -> None:
    with trio.fail_after(CAP):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = await client.post("/v1/jobs", content=b'{"n": 1}', headers=headers)
        assert _json_error(answer, 415)["error"] == "unsupported media type"
        assert len(server.registry) == 0
        assert (await client.get("/health")).status_code == 200


async def test_json_with_a_utf8_charset_is_accepted(client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
            answer = await client.post(
                "/v1/jobs", content=b'{"n": 1}', headers={"Content-Type": content_type}
            )
            assert answer.status_code == 201, answer.text


async def test_deletes_with_a_body_or_another_content_type_cancel_nothing(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 1, "block": True})
        await eventually(lambda: server.registry.get(job_id).state is JobState.RUNNING)
        path = f"/v1/jobs/{job_id}"
        as_text = await client.request("DELETE", path, headers={"Content-Type": "text/plain"})
        assert _json_error(as_text, 415)
        json_type = {"Content-Type": "application/json"}
        with_body = await client.request("DELETE", path, content=b"{}", headers=json_type)
        assert _json_error(with_body, 400)["detail"] == "a DELETE takes no body"
        assert server.registry.get(job_id).state is JobState.RUNNING
        assert (await client.request("DELETE", path, headers=json_type)).status_code == 200


async def test_undeclared_methods_are_405_before_any_content_rule(
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(CAP):
        for method, path in (("POST", "/health"), ("DELETE", "/v1/jobs"), ("PUT", "/v1/jobs")):
            assert _json_error(await client.request(method, path), 405)


# ---- Host names (DNS rebinding) -----------------------------------------------------------


async def test_a_loopback_server_answers_only_its_own_host_names(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery, allowed_hosts=["jobs.example.com"])
        port = srv.url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=srv.url) as c:
            for host in (
                f"127.0.0.1:{port}",
                f"localhost:{port}",
                "localhost",
                f"[::1]:{port}",
                "127.0.0.2",
                "jobs.example.com",
                "JOBS.example.com:443",
            ):
                assert (await c.get("/health", headers={"Host": host})).status_code == 200, host
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
                for method in ("GET", "POST"):
                    answer = await c.request(
                        method, "/v1/jobs", json={"n": 1}, headers={"Host": host}
                    )
                    assert _json_error(answer, 421)["error"] == "misdirected request"
        assert len(srv.registry) == 0


# ---- WebSocket handshakes -----------------------------------------------------------------


async def test_websocket_handshakes_check_origin_and_host(nursery: trio.Nursery) -> None:
    with trio.fail_after(CAP):
        srv = await start_server(nursery, cors_origins=[APP])
        async with httpx.AsyncClient(base_url=srv.url) as c:
            job_id = await submit(c, {"n": 1})
        path = f"/v1/jobs/{job_id}/ws"
        status, body = await ws_handshake_rejection(srv.url, path, {"Origin": EVIL})
        assert (status, body["error"]) == (403, "forbidden")
        status, body = await ws_handshake_rejection(srv.url, path, {"Host": "evil.example"})
        assert (status, body["error"]) == (421, "misdirected request")
        for origin in (APP, srv.url):
            extra = [(b"origin", origin.encode())]
            async with open_ws(f"{srv.ws_url}{path}", extra_headers=extra) as ws:
                lines = [str(await ws.get_message()) for _ in range(2)]
            assert lines[-1] == "[DONE]"


# ---- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origins", "hosts"),
    [
        (["app.example"], []),
        (["http://app.example/"], []),
        (["http://app.example/path"], []),
        (["ftp://app.example"], []),
        (["http://user@app.example"], []),
        ([], ["jobs.example.com:8080"]),
        ([], ["http://jobs.example.com"]),
    ],
)
def test_bad_cors_origins_and_hosts_are_refused_at_once(
    origins: list[str], hosts: list[str]
) -> None:
    with pytest.raises(ValueError, match=r"origin|host"):
        SitePolicy(origins, hosts)
    with pytest.raises(ValueError):
        create_app(JobRegistry(), None, cors_origins=origins, allowed_hosts=hosts)


# ---- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'\xef\xbb\xbf{"n": 1}', "byte order mark"),
        ('{"n": 1}'.encode("utf-16"), "UTF-16"),
        ('{"n": 1}'.encode("utf-16-le"), "UTF-16"),
        ('{"n": 1}'.encode("utf-16-be"), "UTF-16"),
        ('{"n": 1}'.encode("utf-32"), "UTF-16 or UTF-32"),
        ('{"s": "é"}'.encode("latin-1"), "not valid UTF-8"),
    ],
)
async def test_bodies_must_be_utf8_without_a_bom(
    server: Server, client: httpx.AsyncClient, body: bytes, says: str
) -> None:
    with trio.fail_after(CAP):
        answer = await client.post(
            "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
        )
        error = _json_error(answer, 400)
        assert error["error"] == "malformed JSON"
        assert says in error["detail"]
        assert len(server.registry) == 0


async def test_utf8_text_in_a_body_is_kept(server: Server, client: httpx.AsyncClient) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 0, "text": "héllo ☃"})
        assert server.registry.get(job_id).payload == {"n": 0, "text": "héllo ☃"}


# ---- the end of a stream ---------------------------------------------------------------------


async def test_a_resume_at_or_after_the_signal_is_204(
    server: Server, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(CAP):
        job_id = await submit(client, {"n": 3})
        await server.registry.wait(job_id)  # events 1-3, [DONE] is 4
        path = f"/v1/jobs/{job_id}/stream"
        for resume in ({"Last-Event-ID": "4"}, {"Last-Event-ID": "99"}, {}):
            params = {} if resume else {"last_event_id": "4"}
            for method in ("GET", "HEAD"):
                answer = await client.request(method, path, headers=resume, params=params)
                assert answer.status_code == 204, (method, resume)
                assert answer.content == b""
        before = await client.get(path, headers={"Last-Event-ID": "3"})
        assert before.status_code == 200
        assert before.text == "retry: 2000\nid: 4\ndata: [DONE]\n\n"
        assert server.service.watchers(job_id) == 0


async def test_a_running_job_is_never_204(server: Server) -> None:
    with trio.fail_after(CAP):
        async with httpx.AsyncClient(base_url=server.url) as c:
            job_id = await submit(c, {"n": 1, "gate": True})
        await eventually(lambda: len(server.registry.events(job_id)) == 1)
        path = f"/v1/jobs/{job_id}/stream"
        async with RawStream(server.url, path, headers={"Last-Event-ID": "50"}) as raw:
            assert raw.status == 200
            server.gates.open(job_id)
            text = await raw.rest()
        # The job went on past the client's id: only the signal is left after it.
        assert [f.data for f in data_frames(text)] == ["[DONE]"]


async def test_one_call_post_stream_has_the_same_framing(server: Server) -> None:
    with trio.fail_after(CAP):
        async with RawStream(
            server.url,
            "/v1/jobs",
            method="POST",
            headers={"Accept": "text/event-stream", "Content-Type": "application/json"},
            body=json.dumps({"n": 2}).encode(),
        ) as raw:
            text = await raw.rest()
        assert text.startswith("retry: 2000\nid: 1\ndata: {")
        assert text.endswith("id: 3\ndata: [DONE]\n\n")
        blocks = text.split("\n\n")[:-1]
        assert all("\ndata: " in "\n" + block for block in blocks)


# ---- on_disconnect from acceptance ----------------------------------------------------------


async def test_cancel_policy_holds_for_a_client_gone_before_the_body_starts(
    server: Server,
) -> None:
    """A one-call POST whose client leaves after the job was accepted but before the stream
    body started (held here in an ``after_request`` hook, where Quart is between the route
    and the response) still cancels the job; the stream is not left counted as open."""
    accepted = trio.Event()

    @server.app.after_request
    async def hold(response: Any) -> Any:
        if quart.request.method == "POST":
            accepted.set()
            await trio.sleep_forever()  # until the client's disconnect cancels the request
        return response

    with trio.fail_after(CAP):
        async with RawStream(
            server.url,
            "/v1/jobs",
            method="POST",
            headers={"Accept": "text/event-stream", "Content-Type": "application/json"},
            body=json.dumps({"n": 1, "block": True, "on_disconnect": "cancel"}).encode(),
            wait_for_answer=False,
        ):
            await accepted.wait()
        (job_id,) = [record.id for record in server.registry.list_jobs()]
        record = await server.registry.wait(job_id)
        assert record.state is JobState.CANCELLED
        assert server.service.watchers(job_id) == 0
        metrics = (await _get(server, "/metrics", {})).text
        assert 'trio_jobs_open_streams{transport="sse"} 0.0' in metrics


async def test_detached_jobs_go_on_when_the_client_leaves_before_the_body(
    server: Server,
) -> None:
    accepted = trio.Event()

    @server.app.after_request
    async def hold(response: Any) -> Any:
        if quart.request.method == "POST":
            accepted.set()
            await trio.sleep_forever()
        return response

    with trio.fail_after(CAP):
        async with RawStream(
            server.url,
            "/v1/jobs",
            method="POST",
            headers={"Accept": "text/event-stream", "Content-Type": "application/json"},
            body=json.dumps({"n": 1, "gate": True}).encode(),
            wait_for_answer=False,
        ):
            await accepted.wait()
        (job_id,) = [record.id for record in server.registry.list_jobs()]
        await eventually(lambda: server.service.watchers(job_id) == 0)
        assert server.registry.get(job_id).state is JobState.RUNNING
        server.gates.open(job_id)
        assert (await server.registry.wait(job_id)).state is JobState.COMPLETED
