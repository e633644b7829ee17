"""HTTP benchmarks: the trio-jobs job server against the asyncio peer, in one run.

Both servers run as their own processes on loopback (trio-jobs: ``create_app`` + ``serve``
with an executor that emits ``n`` events ``delay`` s apart, like the peer's); one client
(httpx over trio, in this process) measures both with the same code:

- one SSE stream of 200k events: events/s (target >= 1.5x the peer);
- jobs/s end to end, submit + stream 10 events to ``[DONE]``, 1 client and 50 clients
  (target >= 1.0x; trio-jobs uses its one-call ``POST`` with ``Accept: text/event-stream``,
  the peer POST then GET);
- ``DELETE`` -> ``[CANCELLED]`` seen on the open stream: p50/p99 (target p99 <= 5 ms);
- 1,000 concurrent idle open streams: server RSS per stream (target <= 30 KB) and every
  stream gets its ``[DONE]`` when its job ends.

httpx is a costly client and stalls on the peer's kept-alive connections; the per-request
figures that judge the servers come from ``bench_http_raw`` (a raw-socket client).

Run: ``python -m benchmarks.bench_http`` (or ``nox -s bench -- http``). The peer script is
found through ``$TRIO_JOBS_PEER`` or ``../shared/bench/peer_asyncio.py`` from the repo root.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from ._util import now, report, stop

REPO = Path(__file__).resolve().parent.parent
STREAM_EVENTS = 200_000
JOBS_ONE = 300
JOBS_FIFTY = 1_500
CLIENTS = 50
CANCELS = 400
IDLE_STREAMS = 1_000
REPEATS = 3

# ---- the trio-jobs server process ------------------------------------------------------------


class _Counts(trio.abc.Instrument):
    """Counts scheduler work: tasks spawned, task steps (each a trip through the
    scheduler), I/O waits."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {"tasks": 0, "steps": 0, "io_waits": 0}
        self.spawned: dict[str, int] = {}
        self.stepped: dict[str, int] = {}

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.counts["tasks"] += 1
        name = task.name.rsplit(".", 1)[-1]
        self.spawned[name] = self.spawned.get(name, 0) + 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.counts["steps"] += 1
        name = task.name.rsplit(".", 1)[-1]
        self.stepped[name] = self.stepped.get(name, 0) + 1

    def before_io_wait(self, timeout: float) -> None:
        self.counts["io_waits"] += 1


def _serve_trio_jobs(store: str = "memory", retained: int = 0, count: bool = False) -> None:
    """Serve the benchmark app (stdout: ``listening on <url>``) until SIGTERM.

    ``store``: ``memory`` (no store: the peer's equivalent) or ``sqlite:PATH`` (the
    daemons' default, every ``POST`` answered once its row is committed). ``retained``:
    finished jobs put in the registry before serving (how cost grows with them)."""
    import signal

    from quart import Response

    from trio_jobs import narrate, open_registry
    from trio_jobs._stores import SQLiteStore
    from trio_jobs.http import create_app, serve

    release: dict[str, trio.Event | None] = {"event": None}

    async def executor(job_id: str, payload: Any) -> None:
        n = int(payload.get("n", 10))
        delay = float(payload.get("delay", 0.0))
        human = "x" * 16
        for i in range(n):
            if delay:
                await trio.sleep(delay)
            narrate("tick", human, seq=i)
            if not delay and i & 255 == 255:
                await trio.sleep(0)
        if payload.get("gate"):
            event = release["event"]
            assert isinstance(event, trio.Event)
            await event.wait()

    async def main() -> None:
        release["event"] = trio.Event()
        job_store = SQLiteStore(store.partition(":")[2]) if store.startswith("sqlite:") else None
        async with open_registry(
            job_store,
            retention=3600.0 if retained else 30.0,
            event_log_size=STREAM_EVENTS + 16,
        ) as registry:
            for _ in range(retained):
                registry.cancel_job(registry.create_job({"n": 0}), "retained")
            app = create_app(registry, executor)

            @app.post("/bench/release")
            async def release_gates() -> Response:
                event = release["event"]
                assert isinstance(event, trio.Event)
                event.set()
                release["event"] = trio.Event()
                return Response("{}", content_type="application/json")

            async with trio.open_nursery() as nursery:
                url = await nursery.start(serve, app)
                print(f"listening on {url}", flush=True)
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()

    counts = _Counts()
    trio.run(main, instruments=[counts] if count else [])
    if count:
        top = sorted(counts.stepped.items(), key=lambda kv: -kv[1])[:12]
        counts.counts["by_task"] = {k: (counts.spawned.get(k, 0), n) for k, n in top}
        print(json.dumps(counts.counts), flush=True)


@contextmanager
def _server(argv: list[str], name: str, cwd: Path = REPO) -> Iterator[tuple[str, int]]:
    """Start a server process (in ``cwd``, importing from there) and yield its URL and pid."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cwd != REPO:
        env["PYTHONPATH"] = str(cwd)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"{name} did not start: {line!r}")
        yield line.split()[-1].strip(), proc.pid
    finally:
        stop(proc)


def _peer_path() -> Path:
    env = os.environ.get("TRIO_JOBS_PEER")
    path = Path(env) if env else REPO.parent / "shared" / "bench" / "peer_asyncio.py"
    if not path.exists():
        raise SystemExit(f"peer not found at {path}; set TRIO_JOBS_PEER")
    return path


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---- the client side (same code for both servers) ---------------------------------------------


class Target:
    def __init__(self, name: str, url: str, pid: int, one_call: bool) -> None:
        self.name = name
        self.url = url
        self.pid = pid
        self.one_call = one_call


def _client(url: str, connections: int = 10) -> httpx.AsyncClient:
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout: with httpx's
    # default (also 5 s), a request can race the peer closing its connection.
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(30, read=None),
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=2.0,
        ),
    )


async def _count_stream(response: httpx.Response) -> tuple[int, bytes]:
    """Count ``data:`` lines of an SSE body read to its end; return (count, last 64 bytes)."""
    count = 0
    tail = b""
    async for chunk in response.aiter_raw():
        data = tail + chunk
        count += data.count(b"data: ") - tail.count(b"data: ")
        tail = data[-64:]
    return count, tail


async def stream_rate(target: Target) -> float:
    async with _client(target.url) as client:
        start = now()
        created = await client.post("/v1/jobs", json={"n": STREAM_EVENTS, "delay": 0})
        job_id = created.json()["job_id"]
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            count, tail = await _count_stream(response)
        elapsed = now() - start
    assert b"data: [DONE]" in tail, tail
    assert count >= STREAM_EVENTS + 1, count
    return STREAM_EVENTS / elapsed


async def _one_job(client: httpx.AsyncClient, one_call: bool) -> None:
    body = {"n": 10, "delay": 0}
    if one_call:
        async with client.stream(
            "POST", "/v1/jobs", json=body, headers={"Accept": "text/event-stream"}
        ) as response:
            data = await response.aread()
    else:
        job_id = (await client.post("/v1/jobs", json=body)).json()["job_id"]
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            data = await response.aread()
    assert data.endswith(b"data: [DONE]\n\n") or data.endswith(b"data: [DONE]\n\n\n"), data[-40:]


async def jobs_rate(target: Target, clients: int, total: int) -> float:
    async with _client(target.url, clients) as client:
        await _one_job(client, target.one_call)  # warm the connection
        per_client = total // clients
        start = now()

        async def worker() -> None:
            for _ in range(per_client):
                await _one_job(client, target.one_call)

        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(worker)
        elapsed = now() - start
    return per_client * clients / elapsed


async def cancel_latencies(target: Target, count: int) -> list[float]:
    """Time from sending ``DELETE`` to reading ``[CANCELLED]`` on the job's open stream.

    This process's garbage is collected and frozen first, so a collection of the client's
    own leftovers (earlier scenarios) is not counted as the server's latency."""
    gc.collect()
    gc.freeze()
    latencies = []
    async with _client(target.url, 4) as client:
        for _ in range(count):
            job_id = (await client.post("/v1/jobs", json={"n": 100_000, "delay": 0.02})).json()[
                "job_id"
            ]
            first = trio.Event()
            seen: list[float] = []

            async def follow(
                job_id: str = job_id, first: trio.Event = first, seen: list[float] = seen
            ) -> None:
                async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            first.set()
                        elif line == "data: [CANCELLED]":
                            seen.append(now())
                    # read to the end of the body

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await first.wait()
                start = now()
                response = await client.delete(f"/v1/jobs/{job_id}")
                assert response.status_code == 200, response.text
            assert seen, "no [CANCELLED]"
            latencies.append(seen[0] - start)
    return latencies


async def idle_streams(target: Target, count: int, gated: bool) -> tuple[float, int]:
    """RSS per idle open stream (KB) and how many streams got [DONE]."""
    async with _client(target.url, count + 10) as client:
        body: dict[str, Any] = {"n": 1, "gate": True} if gated else {"n": 1, "delay": 12.0}
        job_ids = []
        for _ in range(count):
            job_ids.append((await client.post("/v1/jobs", json=body)).json()["job_id"])
        await trio.sleep(0.5)
        before = _rss_kb(target.pid)
        opened = 0
        all_open = trio.Event()
        done = 0

        async def follow(job_id: str) -> None:
            nonlocal opened, done
            async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                assert response.status_code == 200
                opened += 1
                if opened == count:
                    all_open.set()
                data = await response.aread()
            if b"data: [DONE]" in data:
                done += 1

        async with trio.open_nursery() as nursery:
            for job_id in job_ids:
                nursery.start_soon(follow, job_id)
            await all_open.wait()
            await trio.sleep(0.5)
            after = _rss_kb(target.pid)
            if gated:
                await client.post("/bench/release", json={})
    return (after - before) / count, done


# ---- report -------------------------------------------------------------------------------------


async def _pair(
    fn: Callable[[Target], Awaitable[float]], ours: Target, peer: Target
) -> tuple[float, float]:
    """Best of ``REPEATS`` for each side, the two sides interleaved (the machine is noisy:
    interleaving spreads its noise over both)."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(REPEATS):
        a.append(await fn(ours))
        b.append(await fn(peer))
    return max(a), max(b)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(ours: Target, peer: Target) -> None:
    print(f"trio-jobs {ours.url} (pid {ours.pid}) vs peer {peer.url} (pid {peer.pid})")
    a, b = await _pair(stream_rate, ours, peer)
    report("one SSE stream of 200k events, events/s", f"{a:,.0f} vs {b:,.0f}", a / b, ">= 1.5x")

    a, b = await _pair(lambda t: jobs_rate(t, 1, JOBS_ONE), ours, peer)
    report("jobs/s, 1 client, submit + 10 events", f"{a:,.0f} vs {b:,.0f}", a / b, ">= 1.0x")

    a, b = await _pair(lambda t: jobs_rate(t, CLIENTS, JOBS_FIFTY), ours, peer)
    report("jobs/s, 50 clients, submit + 10 events", f"{a:,.0f} vs {b:,.0f}", a / b, ">= 1.0x")

    ours_lat = await cancel_latencies(ours, CANCELS)
    peer_lat = await cancel_latencies(peer, CANCELS // 8)
    report(
        f"DELETE -> [CANCELLED] p50 / p90 / p99 of {CANCELS}, ms",
        " / ".join(f"{_pct(ours_lat, q) * 1e3:.2f}" for q in (0.5, 0.9, 0.99)),
        None,
        "p99 <= 5 ms",
    )
    report(
        "  peer (cancel seen between events 20 ms apart)",
        " / ".join(f"{_pct(peer_lat, q) * 1e3:.2f}" for q in (0.5, 0.9, 0.99)),
    )

    per_stream, done = await idle_streams(ours, IDLE_STREAMS, gated=True)
    peer_per_stream, peer_done = await idle_streams(peer, IDLE_STREAMS, gated=False)
    report(
        "1,000 idle open streams: server RSS per stream",
        f"{per_stream:.1f} KB vs {peer_per_stream:.1f} KB",
        None,
        "<= 30 KB",
    )
    report("  streams that got [DONE]", f"{done}/{IDLE_STREAMS} vs {peer_done}/{IDLE_STREAMS}")


def main() -> None:
    """Start both servers, run every scenario against each, print figures and ratios."""
    print(
        "HTTP: trio-jobs (quart-trio on hypercorn-trio) vs peer (starlette on uvicorn, asyncio+h11)"
    )
    peer_argv = [sys.executable, str(_peer_path()), "--port", "0"]
    ours_argv = [sys.executable, "-m", "benchmarks.bench_http", "--serve"]
    with (
        _server(ours_argv, "trio-jobs") as (ours_url, ours_pid),
        _server(peer_argv, "peer") as (peer_url, peer_pid),
    ):
        ours = Target("trio-jobs", ours_url, ours_pid, one_call=True)
        peer = Target("peer", peer_url, peer_pid, one_call=False)
        trio.run(run, ours, peer)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help="run the trio-jobs bench server")
    parser.add_argument("--store", default="memory", help="memory or sqlite:PATH (--serve)")
    parser.add_argument("--retained", type=int, default=0, help="finished jobs kept (--serve)")
    parser.add_argument("--count", action="store_true", help="print scheduler counts on exit")
    args = parser.parse_args()
    if args.serve:
        _serve_trio_jobs(args.store, args.retained, args.count)
    else:
        main()
