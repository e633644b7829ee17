"""The dashboard (``GET /ui``) in headless Chromium against real servers.

Two kinds of server, both on real sockets on 127.0.0.1 and both requiring a bearer token:

* an in-process job app (``create_app`` + ``add_ui_routes``, as the daemons mount it) whose
  jobs follow a script in their payload (``say``, ``wait`` for a gate the test opens,
  ``fail``), for the exact cases: progress bars, HTML in narration, resuming after the
  server cuts the stream, throughput, retry;
* real daemon processes (a queen, a hive and a worker of the built-in tiny model that
  spends 50 ms per token), for tokens, live states, cancel and the cluster page.

Every wait is a bounded poll inside the page (``Page.wait_for``); no test sleeps.
Screenshots of the jobs page and of a job page are saved under ``$TRIO_JOBS_ARTIFACTS``
(default: the test's temporary directory).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from servers._ui import CSP, add_ui_routes
from trio_jobs import JobRegistry, NarrationEvent, narrate
from trio_jobs._client import JobClient
from trio_jobs.http import JobService, create_app, job_service, serve

from .browser import Page, artifacts_dir, browser_page, chromium
from .daemons import Cluster, spawn_worker

TOKEN = "ui-test-token-7f3a"
CAP = 60.0
HTML = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"><b>bold</b>'


# ---- an in-process server with scripted jobs -----------------------------------------------


class Script:
    """The executor: a payload's ``steps`` say what the job does, in order.

    ``["say", action, human, fields]`` narrates, ``["wait", gate]`` waits until the test
    opens the gate, ``["fail", message]`` raises.
    """

    def __init__(self) -> None:
        self.gates: dict[str, trio.Event] = {}

    def gate(self, name: str) -> trio.Event:
        return self.gates.setdefault(name, trio.Event())

    async def __call__(self, job_id: str, payload: Any) -> None:
        for step in payload.get("steps", []):
            if step[0] == "say":
                narrate(step[1], step[2], **(step[3] if len(step) > 3 else {}))
            elif step[0] == "wait":
                await self.gate(step[1]).wait()
            elif step[0] == "fail":
                raise RuntimeError(step[1])


@dataclass
class Cutter:
    """ASGI middleware: records each request (path, headers) and can cut open streams."""

    app: Any
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    streams: set[trio.CancelScope] = field(default_factory=set)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append((scope["path"] + "?" + scope["query_string"].decode(), headers))
        with trio.CancelScope() as cut:
            self.streams.add(cut)
            try:
                await self.app(scope, receive, send)
            finally:
                self.streams.discard(cut)

    def cut(self) -> int:
        """Drop every request in progress (the page's stream, mid-body)."""
        for scope in self.streams:
            scope.cancel()
        return len(self.streams)


@dataclass
class UiServer:
    url: str
    registry: JobRegistry
    service: JobService
    script: Script
    cutter: Cutter

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )

    async def submit(self, steps: list[Any], **options: Any) -> str:
        async with self.http() as http:
            response = await http.post("/v1/jobs", json={"steps": steps, **options})
        assert response.status_code == 201, response.text
        job_id: str = response.json()["job_id"]
        return job_id


@pytest.fixture
async def ui_server(nursery: trio.Nursery) -> UiServer:
    registry = JobRegistry()
    script = Script()
    app = create_app(registry, script, name="ui-test", token=TOKEN, max_concurrent=1)
    add_ui_routes(app, sample_s=0.2)
    service = job_service(app)
    assert service is not None
    service.retry_ms = 200
    cutter = Cutter(app.asgi_app)
    app.asgi_app = cutter  # type: ignore[method-assign]  # Quart's middleware hook
    url: str = await nursery.start(lambda task_status: serve(app, task_status=task_status))
    return UiServer(url, registry, service, script, cutter)


PAGE_WATCH = """window.cspViolations = [];
window.pageErrors = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
window.addEventListener("error", (e) => window.pageErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.pageErrors.push(String(e.reason)));
"""


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A browser tab; afterwards, the page must not have broken its own CSP, thrown, or
    shown an error the test did not expect (``trioJobsUi.errors``)."""
    browser = chromium()
    async with browser_page(browser, tmp_path / "profile") as opened:
        opened.init_scripts.append(PAGE_WATCH)
        yield opened
        if opened.session is not None:
            assert await opened.run("window.cspViolations") == []
            assert await opened.run("window.pageErrors") == []
            assert await opened.run("window.trioJobsUi.errors") == []


async def sign_in(page: Page, url: str, hash_: str = "#/jobs") -> None:
    """Open the dashboard, type the token into its sign-in form, and wait for ``hash_``."""
    await page.open(f"{url}/ui{hash_}")
    await page.wait_for("!document.getElementById('view-signin').hidden")
    await page.run("document.getElementById('token').focus()")
    await page.call("Input.insertText", text=TOKEN)
    await page.run("document.querySelector('#signin-form button').click()")
    await page.wait_for("document.getElementById('view-signin').hidden")


def js(value: Any) -> str:
    return json.dumps(value)


# ---- the page itself ------------------------------------------------------------------------


async def test_ui_is_served_without_a_token_with_a_strict_csp(ui_server: UiServer) -> None:
    async with httpx.AsyncClient(base_url=ui_server.url, timeout=10) as anonymous:
        for path, kind in [
            ("/ui", "text/html"),
            ("/ui/", "text/html"),
            ("/ui/app.js", "text/javascript"),
            ("/ui/app.css", "text/css"),
        ]:
            response = await anonymous.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-type"].startswith(kind)
            assert response.headers["content-security-policy"] == CSP
            assert response.headers["x-content-type-options"] == "nosniff"
        page_text = (await anonymous.get("/ui")).text + (await anonymous.get("/ui/app.js")).text
        # Nothing from elsewhere (works offline), and nothing rendered as HTML.
        assert "http://" not in page_text and "https://" not in page_text
        assert "innerHTML" not in page_text and "insertAdjacentHTML" not in page_text
        # The data stays behind the token.
        for path in ("/ui/throughput", "/v1/jobs"):
            assert (await anonymous.get(path)).status_code == 401, path
        # A write to /ui is not a way around the cross-site rules.
        refused = await anonymous.post("/ui", content=b"x", headers={"content-type": "text/plain"})
        assert refused.status_code in (401, 405)
    async with ui_server.http() as http:
        sampled = (await http.get("/ui/throughput")).json()
    assert sampled["interval_s"] == 0.2 and sampled["samples"]


async def test_without_a_token_the_page_needs_no_sign_in(nursery: trio.Nursery, page: Page) -> None:
    with trio.fail_after(CAP):
        registry = JobRegistry()
        app = create_app(registry, Script(), name="open")
        add_ui_routes(app)
        url: str = await nursery.start(lambda task_status: serve(app, task_status=task_status))
        job_id = await registry.submit({"steps": [["say", "note", "hi"]]})
        await page.open(f"{url}/ui")
        await page.wait_for(f"document.querySelector('#jobs tr[data-job-id={js(job_id)}]')")
        assert await page.run("document.getElementById('view-signin').hidden")
        assert await page.run("document.getElementById('sign-out').hidden")
        await page.wait_for(
            "document.getElementById('server-name').textContent === 'trio-jobs open'"
        )


async def test_the_page_signs_in_with_a_token(ui_server: UiServer, page: Page) -> None:
    with trio.fail_after(CAP):
        job_id = await ui_server.submit([["say", "note", "hello"]])
        await ui_server.registry.wait(job_id)
        await page.open(f"{ui_server.url}/ui")
        await page.wait_for("!document.getElementById('view-signin').hidden")
        assert await page.run("document.getElementById('view-jobs').hidden")

        # A wrong token is refused and forgotten.
        await page.run("document.getElementById('token').focus()")
        await page.call("Input.insertText", text="wrong")
        await page.run("document.querySelector('#signin-form button').click()")
        await page.wait_for(
            "document.getElementById('signin-error').textContent.includes('refused')"
        )
        assert await page.run("sessionStorage.length") == 0

        await page.run("document.getElementById('token').focus()")
        await page.call("Input.insertText", text=TOKEN)
        await page.run("document.querySelector('#signin-form button').click()")
        await page.wait_for(f"document.querySelector('#jobs tr[data-job-id={js(job_id)}]')")
        assert await page.run("document.getElementById('token').value") == ""
        assert TOKEN not in await page.run("location.href")
        assert await page.run("sessionStorage.getItem('trio-jobs-token')") == TOKEN
        assert await page.run("document.cookie") == ""

        # The token travelled as a header, never in a URL.
        browser = [h for _, h in ui_server.cutter.seen if "Chrome" in h.get("user-agent", "")]
        sent = [h.get("authorization") for h in browser]
        assert set(sent) == {None, "Bearer wrong", f"Bearer {TOKEN}"}, sent  # None: /ui, /health
        assert not any(TOKEN in path for path, _ in ui_server.cutter.seen)
        assert all(h.get("cookie") is None for _, h in ui_server.cutter.seen)

        await page.run("document.getElementById('sign-out').click()")
        await page.wait_for("!document.getElementById('view-signin').hidden")
        assert await page.run("sessionStorage.length") == 0


async def test_jobs_page_through_the_servers_cursor_or_without_one(
    ui_server: UiServer, page: Page
) -> None:
    with trio.fail_after(CAP):
        ids = [await ui_server.submit([], tags={"set": "paged"}) for _ in range(30)]
        await ui_server.submit([], tags={"set": "other"})
        for job_id in ids:
            await ui_server.registry.wait(job_id)
        async with ui_server.http() as http:
            answer = (await http.get("/v1/jobs", params={"limit": 25})).json()
        await sign_in(page, ui_server.url, "#/jobs?limit=25&tag=set:paged")
        rows = "[...document.querySelectorAll('#jobs tbody tr')].map((tr) => tr.dataset.jobId)"
        newest_first = ids[::-1]
        await page.wait_for(f"{rows}.length === 25")
        assert await page.run(rows) == newest_first[:25]
        if "next_cursor" in answer:  # a server that pages: follow its cursor
            await page.run("document.getElementById('page-next').click()")
            await page.wait_for(f"{rows}.length === 5")
            assert await page.run(rows) == newest_first[25:]
            await page.run("document.getElementById('page-prev').click()")
            await page.wait_for(f"{rows}.length === 25")
        else:  # one that answers everything at once: cut here, say so, nothing to follow
            info = "document.getElementById('page-info').textContent"
            assert await page.run(info) == "showing 25 of 30"
            assert await page.run("document.getElementById('page-next').disabled")
        await page.run("document.querySelector('#filters [name=order]').value = 'asc'")
        await page.run("document.getElementById('filters').requestSubmit()")
        await page.wait_for(f"{rows}[0] === {js(ids[0])}")
        # A time window after every job: nothing matches.
        await page.run(
            "location.hash = '#/jobs?since=' + "
            "new Date(Date.now() + 3600e3 - new Date().getTimezoneOffset() * 60e3)"
            ".toISOString().slice(0, 19)"
        )
        await page.wait_for("!document.getElementById('jobs-empty').hidden")


# ---- one job ----------------------------------------------------------------------------------


async def test_a_progress_event_draws_a_bar(ui_server: UiServer, page: Page) -> None:
    with trio.fail_after(CAP):
        progress = {"done": 3, "total": 10, "unit": "files"}
        job_id = await ui_server.submit(
            [
                ["say", "copy", "Copying files", {"progress": progress}],
                ["wait", "more"],
                ["say", "copy", "Copying files", {"progress": {**progress, "done": 10}}],
            ]
        )
        await sign_in(page, ui_server.url, f"#/job/{job_id}")
        bar = "document.querySelector('#job-progress .bar[data-key=\"copy\"]')"
        await page.wait_for(f"{bar} && {bar}.querySelector('progress').value === 3")
        assert await page.run(f"{bar}.querySelector('progress').max") == 10
        assert await page.run(f"{bar}.querySelector('.figures').textContent") == (
            "3/10 files (30%)"
        )
        assert await page.run(f"{bar}.querySelector('.label').textContent") == "Copying files"
        assert await page.run("document.getElementById('job-log').children.length") == 0
        # The header counts it running, and a second job queued behind it (one at a time).
        behind = await ui_server.submit([])
        await page.wait_for(
            "document.getElementById('queued').textContent === '1'"
            " && document.getElementById('running').textContent === '1'"
        )
        ui_server.script.gate("more").set()
        await page.wait_for("document.getElementById('job-end').dataset.kind === 'DONE'")
        assert await page.run(f"{bar}.querySelector('progress').value") == 10
        assert await page.run("document.querySelectorAll('#job-progress .bar').length") == 1
        await ui_server.registry.wait(behind)
        await page.wait_for("document.getElementById('queued').textContent === '0'")


async def test_narration_containing_html_shows_as_text(ui_server: UiServer, page: Page) -> None:
    with trio.fail_after(CAP):
        job_id = await ui_server.submit(
            [
                ["say", "note", HTML],
                ["say", "token", HTML, {"token": HTML}],
                ["say", "step", "x", {"progress": {"done": 1, "total": 2, "unit": HTML}}],
                ["fail", HTML],
            ],
            tags={"who": "<b>tag</b>"},
        )
        await ui_server.registry.wait(job_id)
        await sign_in(page, ui_server.url, f"#/job/{job_id}")
        await page.wait_for("document.getElementById('job-end').dataset.kind === 'ERROR'")
        assert await page.run("document.querySelector('#job-log .human').textContent") == HTML
        assert await page.run("document.getElementById('job-output').textContent") == HTML
        end = await page.run("document.getElementById('job-end').textContent")
        assert end.startswith("[ERROR]") and HTML in end
        await page.wait_for("document.getElementById('job-payload').textContent.includes('steps')")
        assert HTML in await page.run(
            "document.querySelector('#job-progress .figures').textContent"
        )

        await page.run("location.hash = '#/jobs'")
        await page.wait_for(f"document.querySelector('#jobs tr[data-job-id={js(job_id)}]')")
        row = f"document.querySelector('#jobs tr[data-job-id={js(job_id)}]')"
        assert await page.run(f"{row}.querySelector('.tags').textContent") == "who:<b>tag</b>"
        assert HTML in await page.run(f"{row}.querySelector('.err').textContent")
        # Nothing of it became an element, and nothing ran.
        assert (
            await page.run("document.querySelectorAll('main script, main img, main b').length") == 0
        )
        assert await page.run("typeof window.pwned") == "undefined"
        # And the CSP is the second wall: an inline script that did reach the DOM is blocked.
        await page.run(
            "(() => { const s = document.createElement('script');"
            " s.textContent = 'window.pwned = 3'; document.body.append(s); })()"
        )
        assert await page.wait_for("window.cspViolations.length") == 1
        assert await page.run("window.cspViolations[0]") == "script-src-elem inline"
        assert await page.run("typeof window.pwned") == "undefined"
        await page.run("window.cspViolations = []")


async def test_the_stream_resumes_after_a_drop_without_gap_or_duplicate(
    ui_server: UiServer, page: Page
) -> None:
    with trio.fail_after(CAP):
        steps: list[Any] = [["say", "step", f"event {n}"] for n in (1, 2, 3)]
        steps += [["wait", "go"]]
        steps += [["say", "step", f"event {n}"] for n in (4, 5, 6)]
        job_id = await ui_server.submit(steps)
        await sign_in(page, ui_server.url, f"#/job/{job_id}")
        await page.wait_for("document.querySelectorAll('#job-log li').length === 3")
        assert ui_server.cutter.cut() >= 1  # the server drops the page's open stream
        ui_server.script.gate("go").set()
        await page.wait_for("document.getElementById('job-end').dataset.kind === 'DONE'")
        ids = await page.run(
            "[...document.querySelectorAll('#job-log li')].map((li) => li.dataset.eventId)"
        )
        humans = await page.run(
            "[...document.querySelectorAll('#job-log .human')].map((s) => s.textContent)"
        )
        assert ids == [str(n) for n in range(1, 7)]
        assert humans == [f"event {n}" for n in range(1, 7)]
        # An event the page already showed is dropped, whatever brings it again.
        again = js(json.dumps({"id": 2, "action": "step", "human": "event 2"}))
        await page.run(f"window.trioJobsUi.follower.dispatch({again}, '2')")
        assert await page.run("document.querySelectorAll('#job-log li').length") == 6
        streams = [
            h
            for path, h in ui_server.cutter.seen
            if path.endswith("/stream?") and h.get("authorization") == f"Bearer {TOKEN}"
        ]
        assert [h.get("last-event-id") for h in streams] == [None, "3"]


async def test_retry_resubmits_the_same_payload_and_options(
    ui_server: UiServer, page: Page
) -> None:
    with trio.fail_after(CAP):
        steps = [["fail", "flaky"]]
        options = {"tags": {"team": "ui"}, "priority": "high", "timeout_s": 30, "metadata": [1]}
        job_id = await ui_server.submit(steps, **options)
        await ui_server.registry.wait(job_id)
        await sign_in(page, ui_server.url, f"#/job/{job_id}")
        await page.wait_for("!document.getElementById('job-retry').disabled")
        assert await page.run("document.getElementById('job-cancel').disabled")
        await page.run("document.getElementById('job-retry').click()")
        new_hash = await page.wait_for(
            f"location.hash !== {js('#/job/' + job_id)} && location.hash"
        )
        new_id = new_hash.removeprefix("#/job/")
        record = (await ui_server.registry.wait(new_id)).to_dict()
        assert record["payload"] == {"steps": steps}
        assert record["tags"] == {"team": "ui"}
        assert record["priority"] == "high"
        assert record["timeout_s"] == 30
        assert record["metadata"] == [1]
        await page.wait_for(f"document.getElementById('job-id').textContent === {js(new_id)}")
        await page.wait_for("document.getElementById('job-end').dataset.kind === 'ERROR'")


async def test_throughput_chart_counts_finished_jobs(
    ui_server: UiServer, page: Page, tmp_path: Path
) -> None:
    with trio.fail_after(CAP):
        done = [await ui_server.submit([]) for _ in range(3)]
        failed = await ui_server.submit([["fail", "no"]])
        for job_id in [*done, failed]:
            await ui_server.registry.wait(job_id)
        await sign_in(page, ui_server.url, "#/throughput")
        row = "document.querySelector('#throughput-totals tr[data-state=\"{}\"]')"
        await page.wait_for(f"{row.format('completed')}?.children[1].textContent === '3'")
        assert await page.run(f"{row.format('failed')}.children[1].textContent") == "1"
        assert await page.run("Number(document.getElementById('throughput').dataset.bins)") >= 1
        await page.screenshot(artifacts_dir(tmp_path) / "ui-throughput.png")


# ---- real daemons -------------------------------------------------------------------------------


@dataclass
class Daemons:
    queen: str
    hive: str
    worker: dict[str, Any]

    def client(self) -> JobClient:
        return JobClient(self.queen, token=TOKEN)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.queen, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    root = tmp_path_factory.mktemp("ui-daemons")
    cluster = Cluster(root)
    try:
        auth = ["--token", TOKEN]
        hive = cluster.start(
            "hive", ["hive", "--port", "0", "--models-dir", str(root / "models"), *auth]
        )
        queen = cluster.start(
            "queen", ["queen", "--port", "0", "--hive", f"localhost={hive}", *auth]
        )

        async def spawn() -> dict[str, Any]:
            async with JobClient(queen, token=TOKEN) as client:
                return await spawn_worker(client, "slow", token_delay_s=0.05)

        yield Daemons(queen, hive, trio.run(spawn))
    finally:
        cluster.close()


def infer(max_tokens: int) -> dict[str, Any]:
    return {"operation": "infer", "model": "slow", "prompt": "hello", "max_tokens": max_tokens}


async def test_jobs_table_fills_and_a_job_changes_state_live(
    daemons: Daemons, page: Page, tmp_path: Path
) -> None:
    with trio.fail_after(CAP):
        async with daemons.client() as client:
            earlier = [await client.submit(infer(2), tags={"batch": "a"}) for _ in range(3)]
            for job_id in earlier:
                await client.wait(job_id)
            await sign_in(page, daemons.queen)
            for job_id in earlier:
                await page.wait_for(f"document.querySelector('#jobs tr[data-job-id={js(job_id)}]')")
            await page.run("window.sameDocument = true")

            live = await client.submit(infer(40), tags={"batch": "b"})
            row = f"document.querySelector('#jobs tr[data-job-id={js(live)}]')"
            await page.wait_for(f"{row} && {row}.dataset.state === 'running'")
            await page.wait_for("Number(document.getElementById('running').textContent) >= 1")
            await page.screenshot(artifacts_dir(tmp_path) / "ui-jobs.png")
            await page.wait_for(f"{row}.dataset.state === 'completed'", timeout_s=15)
            assert await page.run("window.sameDocument") is True  # no reload

            # Filters: a tag, then a state.
            await page.run("location.hash = '#/jobs?tag=batch:b'")
            await page.wait_for(
                f"document.querySelectorAll('#jobs tbody tr').length === 1 && {row}"
            )
            await page.run("location.hash = '#/jobs?state=running'")
            await page.wait_for("document.querySelectorAll('#jobs tbody tr').length === 0")
            assert await page.run("document.getElementById('filters').elements.state.value") == (
                "running"
            )


async def test_a_job_page_shows_its_tokens_arriving_and_done(
    daemons: Daemons, page: Page, tmp_path: Path
) -> None:
    with trio.fail_after(CAP):
        async with daemons.client() as client:
            job_id = await client.submit(infer(40))
            await sign_in(page, daemons.queen, f"#/job/{job_id}")
            output = "document.getElementById('job-output').textContent"
            # Tokens arrive while the job still runs.
            partial = await page.wait_for(
                f"{output}.length > 0 && document.getElementById('job-end').hidden && {output}"
            )
            await page.wait_for("document.getElementById('job-end').dataset.kind === 'DONE'")
            assert await page.run("document.getElementById('job-end').textContent") == (
                "[DONE] completed"
            )
            tokens = []
            async with client.stream(job_id) as stream:  # the same job's stream, replayed
                async for item in stream:
                    if isinstance(item, NarrationEvent) and item.action == "token":
                        tokens.append(str(item.fields["token"]))
        text = await page.run(output)
        assert text == "".join(tokens) and len(tokens) == 40
        assert 0 < len(partial) < len(text)
        await page.wait_for("document.getElementById('job-state').textContent === 'completed'")
        await page.wait_for("document.querySelectorAll('#job-history li').length >= 3")
        history = await page.run(
            "[...document.querySelectorAll('#job-history .state')].map((s) => s.textContent)"
        )
        assert history == ["queued", "running", "completed"]
        await page.screenshot(artifacts_dir(tmp_path) / "ui-job.png")


async def test_cancel_from_the_page_ends_the_job_cancelled(daemons: Daemons, page: Page) -> None:
    with trio.fail_after(CAP):
        async with daemons.client() as client:
            job_id = await client.submit(infer(1000))
            await sign_in(page, daemons.queen, f"#/job/{job_id}")
            await page.wait_for("document.getElementById('job-output').textContent.length > 0")
            await page.wait_for("!document.getElementById('job-cancel').disabled")
            await page.run("document.getElementById('job-cancel').click()")
            await page.wait_for("document.getElementById('job-end').dataset.kind === 'CANCELLED'")
            record = await client.get(job_id)
        assert record["state"] == "cancelled"
        end = await page.wait_for(
            "document.getElementById('job-end').textContent.includes('cancelled over HTTP')"
            " && document.getElementById('job-end').textContent"
        )
        assert end.startswith("[CANCELLED]")
        await page.wait_for("document.getElementById('job-cancel').disabled")


async def test_cluster_page_shows_workers_and_hives_live(
    daemons: Daemons, page: Page, tmp_path: Path
) -> None:
    with trio.fail_after(CAP):
        await sign_in(page, daemons.queen, "#/cluster")
        worker = f"document.querySelector('#workers tr[data-worker-id={js(daemons.worker['id'])}]')"
        await page.wait_for(worker)
        cells = await page.run(f"[...{worker}.children].map((td) => td.textContent)")
        assert cells[1] == "slow" and cells[2] == "ready" and cells[5] == "localhost"
        assert cells[4].endswith(" s")
        hive = "document.querySelector('#hives tr[data-alias=\"localhost\"]')"
        await page.wait_for(f"{hive} && {hive}.children[2].textContent === 'ok'")
        assert await page.run(f"{hive}.children[1].textContent") == daemons.hive
        # Live: the heartbeat age changes without a reload.
        first = cells[4]
        await page.wait_for(f"{worker} && {worker}.children[4].textContent !== {js(first)}")
        await page.screenshot(artifacts_dir(tmp_path) / "ui-cluster.png")


async def test_the_hive_serves_the_same_dashboard(daemons: Daemons) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for path in ("/ui", "/ui/app.js"):
            queen, hive = await http.get(daemons.queen + path), await http.get(daemons.hive + path)
            assert queen.status_code == hive.status_code == 200
            assert queen.content == hive.content
            assert hive.headers["content-security-policy"] == CSP
        assert (await http.get(daemons.hive + "/ui/throughput")).status_code == 401
        # The hive keeps no worker or hive table: the page says so instead of failing.
        assert (await http.get(daemons.queen + "/ui/hives")).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await http.get(daemons.hive + "/ui/hives", headers=auth)).status_code == 404
