"""A real browser against real servers: headless Chromium (Debian's ``chromium``) driven
over the DevTools protocol (CDP) on a trio-websocket connection.

Three servers on 127.0.0.1, each on its own port (so each its own origin): a page server,
a job server that allows the page's origin (CORS), and one that does not. The page
submits a job to the first with ``fetch`` (JSON, preflighted), reads its stream with
``EventSource`` and sees it stop reconnecting after the signal (the server sees exactly
one reconnect, answered 204, or none); a ``no-cors`` ``text/plain`` POST creates no job
anywhere, and a JSON POST to the server that does not allow the page is stopped by its
preflight.

The browser helpers live in ``tests/browser.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from quart import Response
from quart_trio import QuartTrio

from trio_jobs.http import serve

from .browser import browser_page, chromium
from .test_http_server import Server, start_server

CAP = 60.0
RETRY_MS = 200
N = 3


# ---- servers -------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request a server answered: method, path, headers (lower case), status."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class Recorder:
    """ASGI middleware recording every HTTP request and its answer's status."""

    app: Any
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        entry = Seen(scope["method"], scope["path"], headers)
        self.seen.append(entry)

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)

        await self.app(scope, receive, recording_send)


async def job_server(nursery: trio.Nursery, **options: Any) -> tuple[Server, Recorder]:
    srv = await start_server(nursery, **options)
    srv.service.retry_ms = RETRY_MS
    recorder = Recorder(srv.app.asgi_app)
    srv.app.asgi_app = recorder
    return srv, recorder


async def page_server(nursery: trio.Nursery) -> str:
    app = QuartTrio("page")

    @app.get("/")
    async def page() -> Response:
        return Response("<!doctype html><title>page</title>", content_type="text/html")

    url: str = await nursery.start(serve, app)
    return url


# ---- the tests -------------------------------------------------------------------------------

SUBMIT = """(async () => {
  const r = await fetch(%(api)s + "/v1/jobs", {
    method: "POST", headers: {"content-type": "application/json"}, body: %(body)s});
  return {status: r.status, body: await r.json(), location: r.headers.get("location")};
})()"""

FOLLOW = """new Promise((resolve) => {
  const seen = [];
  const source = new EventSource(%(url)s);
  source.onmessage = (e) => seen.push({id: e.lastEventId, data: e.data});
  source.onerror = () => {
    seen.push({error: source.readyState});
    if (source.readyState === EventSource.CLOSED) resolve(seen);
  };
  setTimeout(() => { source.close(); seen.push({gave_up: true}); resolve(seen); }, 10000);
})"""

CROSS_SITE = """(async () => {
  const out = {};
  const simple = {method: "POST", mode: "no-cors",
                  headers: {"content-type": "text/plain"}, body: '{"n": 1}'};
  for (const [name, api] of [["allowed", %(allowed)s], ["other", %(other)s]]) {
    try { out["no_cors_" + name] = (await fetch(api + "/v1/jobs", simple)).type; }
    catch (e) { out["no_cors_" + name] = "error " + e.name; }
  }
  try {
    const r = await fetch(%(other)s + "/v1/jobs", {
      method: "POST", headers: {"content-type": "application/json"}, body: '{"n": 1}'});
    out.json_other = r.status;
  } catch (e) { out.json_other = "blocked " + e.name; }
  try { out.read_other = (await fetch(%(other)s + "/v1/jobs")).status; }
  catch (e) { out.read_other = "blocked " + e.name; }
  return out;
})()"""


async def test_a_page_reads_a_stream_cross_origin_and_cannot_submit_cross_site(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    browser = chromium()
    with trio.fail_after(CAP):
        page_url = await page_server(nursery)
        allowed, allowed_log = await job_server(nursery, cors_origins=[page_url])
        other, other_log = await job_server(nursery)
        async with browser_page(browser, tmp_path / "profile") as page:
            await page.open(page_url + "/")
            assert await page.run("location.origin") == page_url

            # A JSON submit from an allowed origin: preflighted, answered, readable.
            created = await page.run(
                SUBMIT % {"api": json.dumps(allowed.url), "body": json.dumps(f'{{"n": {N}}}')}
            )
            assert created["status"] == 201, created
            job_id = created["body"]["job_id"]
            assert created["location"] == f"/v1/jobs/{job_id}"
            assert [s.method for s in allowed_log.seen if s.path == "/v1/jobs"] == [
                "OPTIONS",
                "POST",
            ]
            await allowed.registry.wait(job_id)

            # EventSource reads every event, then stops at the 204 after the signal.
            stream = f"{allowed.url}/v1/jobs/{job_id}/stream"
            seen = await page.run(FOLLOW % {"url": json.dumps(stream)})
            messages = [s for s in seen if "data" in s]
            assert [m["id"] for m in messages] == [str(i) for i in range(1, N + 2)]
            assert messages[-1]["data"] == "[DONE]"
            assert [json.loads(m["data"])["id"] for m in messages[:-1]] == list(range(1, N + 1))
            assert seen[-1] == {"error": 2}, seen  # CLOSED: no more reconnects
            await trio.sleep(5 * RETRY_MS / 1000)  # would it come back? (real time, bounded)
            gets = [
                s
                for s in allowed_log.seen
                if s.method == "GET" and s.path == f"/v1/jobs/{job_id}/stream"
            ]
            assert gets[0].status == 200
            assert gets[0].headers["origin"] == page_url
            reconnects = gets[1:]
            assert len(reconnects) <= 1, [(s.status, s.headers) for s in reconnects]
            for again in reconnects:
                assert again.status == 204
                assert again.headers["last-event-id"] == str(N + 1)

            # Cross-site submits create nothing.
            before = len(allowed.registry)
            result = await page.run(
                CROSS_SITE % {"allowed": json.dumps(allowed.url), "other": json.dumps(other.url)}
            )
            assert result["no_cors_allowed"] == "opaque"  # sent, answer hidden: a 415
            assert result["no_cors_other"] == "opaque"  # sent, answer hidden: a 403
            assert result["json_other"] == "blocked TypeError"
            assert result["read_other"] == "blocked TypeError"
            assert len(allowed.registry) == before
            assert len(other.registry) == 0
            answered = {
                (s.method, s.headers.get("content-type"), s.status) for s in allowed_log.seen
            }
            assert ("POST", "text/plain", 415) in answered
            other_answers = [(s.method, s.status) for s in other_log.seen if s.path == "/v1/jobs"]
            assert ("POST", 403) in other_answers  # the no-cors one
            assert ("OPTIONS", 403) in other_answers  # the JSON one never got past its preflight
            assert [m for m, status in other_answers if m == "POST"] == ["POST"]
            assert all(status in (403, 415) for _, status in other_answers)
        nursery.cancel_scope.cancel()
