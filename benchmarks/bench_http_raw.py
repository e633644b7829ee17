"""HTTP per-request speed, measured with a raw-socket client: trio-jobs against the peers.

The servers, each its own process on loopback, in one run:

- ``trio-jobs``: ``create_app`` + ``serve``, no store (a memory registry: the peer's
  equivalent);
- ``trio-jobs+sqlite``: the same on a SQLite store (the daemons' default: every ``POST``
  is answered once its row is committed);
- ``peer h11``: starlette + sse-starlette on uvicorn, asyncio + h11
  (``../shared/bench/peer_asyncio.py``);
- ``peer uvloop``: the same with uvloop + httptools (when they are installed).

The client (``_rawclient``) runs in child processes, writes each request with one send and
parses responses with a few string operations, so it costs far less than the servers; its
CPU share is printed. Scenarios (``--seconds`` each, servers alternated, median of
``--repeat`` runs, ratio to ``peer h11`` of the same run):

1. jobs/s: ``POST /v1/jobs`` then ``GET`` its stream of 10 events to ``[DONE]``; 1 and 32
   clients; fresh connections (one per request) and kept-alive ones. Also the one-call
   ``POST`` with ``Accept: text/event-stream`` (trio-jobs only; its ratio is to the peer's
   two requests). Server CPU per job is printed too: it is steadier than jobs/s on a busy
   machine.
2. ``DELETE`` -> ``[CANCELLED]`` seen on the job's open stream: p50 / p90 / p99.
3. How cost grows (``--scale``): jobs/s with 0, 10k and 100k finished jobs retained in
   the registry; SSE events/s with 1, 100 and 1,000 concurrent streams (200k events in
   all); server RSS per open idle stream with 1, 100 and 1,000 of them.

With ``TRIO_JOBS_BASELINE=<another checkout>`` its server (``trio-jobs@base``) is measured
too, in the same run: before/after figures that share the machine's noise.

Run: ``python -m benchmarks.bench_http_raw [--seconds S] [--repeat R] [--scale]
[--only jobs,cancel] [--servers a,b]`` (or ``python -m benchmarks http-raw``).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._rawclient import READ, connect, request, response
from .bench_http import REPO, _peer_path, _rss_kb, _server

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    url: str
    pid: int
    ours: bool

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.url.rsplit("//", 1)[1].rsplit(":", 1)
        return host, int(port)


@dataclass
class Run:
    jobs: int
    events: int
    wall: float
    client_cpu: float
    server_cpu: float
    latencies: list[float] = field(repr=False)

    @property
    def rate(self) -> float:
        return self.jobs / self.wall


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def load(server: Server, spec: dict[str, Any], procs: int = 1) -> Run:
    """Run ``spec["clients"]`` clients spread over ``procs`` client processes."""
    start_at = time.time() + 0.3
    per = [spec["clients"] // procs + (i < spec["clients"] % procs) for i in range(procs)]
    host, port = server.addr
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks._rawclient",
                host,
                str(port),
                json.dumps({**spec, "clients": n, "start_at": start_at}),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for n in per
        if n
    ]
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = _cpu_s(server.pid)
    results = []
    for child in children:
        out, _ = child.communicate(timeout=spec["seconds"] + 120)
        results.append(json.loads(out))
    cpu = _cpu_s(server.pid) - cpu0
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"{server.name}: {errors[0]}")
    return Run(
        jobs=sum(r["jobs"] for r in results),
        events=sum(r["events"] for r in results),
        wall=max(r["wall"] for r in results),
        client_cpu=sum(r["cpu"] for r in results),
        server_cpu=cpu,
        latencies=[x for r in results for x in r["latencies"]],
    )


BASELINE = os.environ.get("TRIO_JOBS_BASELINE")
"""A checkout of trio-jobs to measure beside this one (``trio-jobs@base``), in the same
run: before/after figures that share the machine's noise."""


@contextmanager
def servers(kinds: list[str], *, retained: int = 0) -> Iterator[list[Server]]:
    """Start the servers named in ``kinds``."""
    ours = [sys.executable, "-m", "benchmarks.bench_http", "--serve"]
    peer = [sys.executable, str(_peer_path()), "--port", "0"]
    argv = {
        "trio-jobs": [*ours, "--retained", str(retained)],
        "peer h11": peer,
        "peer uvloop": [*peer, "--fast"],
    }
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        argv["trio-jobs+sqlite"] = [*ours, "--store", f"sqlite:{tmp / 'jobs.sqlite'}"]
        started = []
        for kind in kinds:
            cwd = REPO
            if kind.endswith("@base"):
                assert BASELINE, "set TRIO_JOBS_BASELINE"
                cwd = Path(BASELINE)
                argv[kind] = argv[kind.removesuffix("@base")]
            url, pid = stack.enter_context(_server(argv[kind], kind, cwd))
            server = Server(kind, url, pid, kind.startswith("trio-jobs"))
            _until_listening(server)
            started.append(server)
        yield started


def _until_listening(server: Server) -> None:
    """The peer prints its address once bound, before it listens: wait for the listen."""
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(server.addr, timeout=1).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _have_uvloop() -> bool:
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _line(name: str, figure: str, extra: str = "") -> None:
    print(f"  {name:<44} {figure:>24}  {extra}", flush=True)


def _median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


# ---- 1. jobs/s -------------------------------------------------------------------------


def jobs_scenarios(all_servers: list[Server], seconds: float, repeat: int) -> None:
    configs = [
        (mode, clients, one_call)
        for one_call in (False, True)
        for mode in ("fresh", "keep")
        for clients in (1, 32)
    ]
    for server in all_servers:  # warm up (imports, first requests)
        load(server, _spec("keep", 4, False, 0.3))
    results: dict[tuple[str, str, int, bool], list[Run]] = {}
    for _ in range(repeat):
        for mode, clients, one_call in configs:
            for server in all_servers:
                if one_call and not server.ours:
                    continue
                run = load(server, _spec(mode, clients, one_call, seconds), _procs(clients))
                results.setdefault((server.name, mode, clients, one_call), []).append(run)
    print(
        f"jobs/s, POST /v1/jobs + GET its stream of 10 events; median of {repeat} runs of "
        f"{seconds:g} s; ratio to peer h11 (two-step)"
    )
    for mode, clients, one_call in configs:
        peer = results.get(("peer h11", mode, clients, False))
        base = statistics.median(r.rate for r in peer) if peer else float("nan")
        title = f"{clients} client{'s' if clients > 1 else ''}, {mode} connections" + (
            ", one-call POST" if one_call else ""
        )
        print(f" {title}")
        for server in all_servers:
            runs = results.get((server.name, mode, clients, one_call))
            if not runs:
                continue
            rate = statistics.median(r.rate for r in runs)
            med = _median_run(runs)
            cpu_us = med.server_cpu / max(1, med.jobs) * 1e6
            share = med.client_cpu / max(1e-9, med.client_cpu + med.server_cpu)
            lat = sorted(med.latencies)
            p50 = lat[len(lat) // 2] * 1e3 if lat else float("nan")
            _line(
                server.name,
                f"{rate:,.0f} jobs/s  {rate / base:5.2f}x",
                f"server {cpu_us:,.0f} us/job, client CPU share {share:.0%}, p50 {p50:.2f} ms "
                f"(runs: {', '.join(f'{r.rate:,.0f}' for r in runs)})",
            )


def _spec(mode: str, clients: int, one_call: bool, seconds: float, **more: Any) -> dict[str, Any]:
    return {
        "keep": mode == "keep",
        "clients": clients,
        "one_call": one_call,
        "seconds": seconds,
        **more,
    }


def _procs(clients: int) -> int:
    return 1 if clients < 8 else 2


# ---- 2. DELETE -> [CANCELLED] ------------------------------------------------------------


def _blocking(gen: Any) -> Any:
    """Drive a ``_rawclient`` generator with blocking waits."""
    try:
        sock, events = next(gen)
        while True:
            poll = select.poll()
            poll.register(sock, events)
            poll.poll()
            sock, events = gen.send(None)
    except StopIteration as stop:
        return stop.value


def cancel_latencies(server: Server, count: int) -> list[float]:
    """Time from writing ``DELETE`` to reading ``[CANCELLED]`` on the job's open stream."""
    host = f"{server.addr[0]}:{server.addr[1]}"
    body = b'{"n": 100000, "delay": 0.02}'
    ctl = _Control(server)
    latencies = []
    for _ in range(count):
        status, content = ctl.call("POST", "/v1/jobs", body)
        assert status == 201, content
        job_id = json.loads(content)["job_id"]
        stream = _blocking(connect(server.addr))
        stream.send(request("GET", f"/v1/jobs/{job_id}/stream", host))
        seen = b""
        while b"data: {" not in seen:
            _wait(stream)
            seen += stream.recv(65536)
        start = time.perf_counter()
        ctl.open().send(request("DELETE", f"/v1/jobs/{job_id}", host))
        seen = seen[-32:]
        while b"[CANCELLED]" not in seen:
            _wait(stream)
            data = stream.recv(65536)
            if not data:
                raise RuntimeError("stream ended without [CANCELLED]")
            seen = seen[-32:] + data
        latencies.append(time.perf_counter() - start)
        status, content, close = _blocking(response(ctl.open(), ctl.buf))
        assert status == 200, content
        if close:
            ctl.close()
        stream.close()
    ctl.close()
    return latencies


def _wait(sock: socket.socket) -> None:
    poll = select.poll()
    poll.register(sock, READ)
    poll.poll()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cancel_scenario(all_servers: list[Server], count: int) -> None:
    print(f"DELETE -> [CANCELLED] on the open stream, {count} cancels, p50 / p90 / p99 ms")
    for server in all_servers:
        n = count if server.ours else max(20, count // 8)
        lat = cancel_latencies(server, n)
        figure = " / ".join(f"{_pct(lat, q) * 1e3:.2f}" for q in (0.5, 0.9, 0.99))
        note = (
            "(target p99 <= 5 ms)" if server.ours else "(peer: checks between events 20 ms apart)"
        )
        _line(server.name, figure, note)


# ---- 3. how cost grows ------------------------------------------------------------------


def scale_scenarios(seconds: float, repeat: int) -> None:
    print(f"how cost grows (median of {repeat} runs of {seconds:g} s)")
    print(" jobs/s with finished jobs retained in the registry (32 clients, keep; fresh)")
    rates: dict[tuple[int, str], list[float]] = {}
    for retained in (0, 10_000, 100_000):
        with servers(["trio-jobs"], retained=retained) as (server,):
            rss = _rss_kb(server.pid)
            load(server, _spec("keep", 4, False, 0.3))
            for _ in range(repeat):
                for mode in ("keep", "fresh"):
                    run = load(server, _spec(mode, 32, False, seconds), 2)
                    rates.setdefault((retained, mode), []).append(run.rate)
        base = {m: statistics.median(rates[(0, m)]) for m in ("keep", "fresh")}
        figures = [
            f"{statistics.median(rates[(retained, m)]):,.0f} "
            f"({statistics.median(rates[(retained, m)]) / base[m]:.2f}x)"
            for m in ("keep", "fresh")
        ]
        _line(f"{retained:,} retained (server RSS {rss / 1024:,.0f} MB)", " ; ".join(figures))

    with servers(["trio-jobs", "peer h11"]) as both:
        print(" SSE, 200k events in all over N concurrent streams: events/s (ratio to peer h11)")
        for streams in (1, 100, 1_000):
            per = 200_000 // streams
            got: dict[str, list[Run]] = {}
            for _ in range(repeat):
                for server in both:
                    spec = _spec("keep", streams, False, 600.0, max_jobs=1, body=f'{{"n": {per}}}')
                    run = load(server, spec, 1 if streams == 1 else 2)
                    got.setdefault(server.name, []).append(run)
            ours, peer = (statistics.median(r.events / r.wall for r in got[s.name]) for s in both)
            cpu = [
                statistics.median(r.server_cpu / r.events * 1e6 for r in got[s.name]) for s in both
            ]
            share = statistics.median(
                r.client_cpu / max(1e-9, r.client_cpu + r.server_cpu) for r in got[both[0].name]
            )
            _line(
                f"{streams:,} stream(s) x {per:,} events",
                f"{ours:,.0f} vs {peer:,.0f}",
                f"{ours / peer:.2f}x; server {cpu[0]:.1f} vs {cpu[1]:.1f} us/event, "
                f"client CPU share {share:.0%}",
            )
    print(" server RSS per open idle stream (a fresh server each)")
    for streams in (1, 100, 1_000):
        with servers(["trio-jobs", "peer h11"]) as both:
            per_stream = [idle_rss(server, streams) for server in both]
        _line(
            f"{streams:,} open stream(s)",
            " vs ".join(f"{kb:.1f} KB" for kb in per_stream),
            "(trio-jobs vs peer h11)",
        )


class _Control:
    """A kept-alive connection for set-up requests (reopened when the server closes it,
    as hypercorn does after 1,000 requests)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.host = f"{server.addr[0]}:{server.addr[1]}"
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def open(self) -> socket.socket:
        if self.sock is None:
            self.sock = _blocking(connect(self.server.addr))
            self.buf.clear()
        return self.sock

    def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        self.open().send(request(method, path, self.host, body))
        status, content, close = _blocking(response(self.open(), self.buf))
        if close:
            self.close()
        return status, content

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def idle_rss(server: Server, streams: int) -> float:
    """Server RSS growth per open stream of a job that waits (KB): jobs are created first,
    then the streams are opened and held; RSS is read before and after opening them.
    Use a fresh server: memory freed by earlier work would be reused unseen."""
    body = b'{"n": 1, "gate": true}' if server.ours else b'{"n": 1, "delay": 60}'
    ctl = _Control(server)
    ids = []
    for _ in range(streams):
        status, content = ctl.call("POST", "/v1/jobs", body)
        assert status == 201, content
        ids.append(json.loads(content)["job_id"])
    time.sleep(0.5)
    before = _rss_kb(server.pid)
    socks = []
    for job_id in ids:
        sock = _blocking(connect(server.addr))
        sock.send(request("GET", f"/v1/jobs/{job_id}/stream", ctl.host))
        status, _, _ = _blocking(response(sock, bytearray(), head_only=True))
        assert status == 200
        socks.append(sock)
    time.sleep(0.5)
    after = _rss_kb(server.pid)
    for sock in socks:
        sock.close()
    if server.ours:
        ctl.call("POST", "/bench/release", b"{}")
    ctl.close()
    return (after - before) / streams


# ---- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cancels", type=int, default=400)
    parser.add_argument("--only", default="jobs,cancel", help="comma list: jobs, cancel, scale")
    parser.add_argument("--servers", default="", help="comma list (default: all)")
    parser.add_argument("--scale", action="store_true", help="also run the scale scenarios")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    if args.scale:
        parts.add("scale")
    kinds = ["trio-jobs", "trio-jobs+sqlite", "peer h11"]
    if _have_uvloop():
        kinds.append("peer uvloop")
    if BASELINE:
        kinds.insert(1, "trio-jobs@base")
    if args.servers:
        kinds = [k for k in kinds if k in args.servers.split(",")]
    print(f"HTTP, raw-socket client; {os.cpu_count()} cores; servers: {', '.join(kinds)}")
    if parts & {"jobs", "cancel"}:
        with servers(kinds) as started:
            if "jobs" in parts:
                jobs_scenarios(started, args.seconds, args.repeat)
            if "cancel" in parts:
                cancel_scenario([s for s in started if s.name != "peer uvloop"], args.cancels)
    if "scale" in parts:
        scale_scenarios(args.seconds, args.repeat)


if __name__ == "__main__":
    main()
