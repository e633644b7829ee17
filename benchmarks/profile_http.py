"""Where a request's time goes: scheduler work per job on the trio-jobs bench server.

For each scenario a fresh server (``bench_http --serve --count``: a ``trio.abc.Instrument``
counting tasks spawned, task steps and I/O waits) takes ``--jobs`` jobs from one raw
client (``_rawclient``), then stops and prints its counts; this prints them per job, with
the server's CPU time per job. Startup work is included but is negligible beside
thousands of jobs.

``--py-spy FILE``: also record the server under 32 clients on fresh connections with
py-spy (``--format raw``, collapsed stacks) and print the share of samples per package.

Run: ``python -m benchmarks.profile_http [--jobs N] [--store sqlite] [--py-spy FILE]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_http import REPO
from .bench_http_raw import Server, _cpu_s, _spec, _until_listening, load

SCENARIOS = {
    "POST only, fresh": _spec("fresh", 1, False, 600.0, post_only=True),
    "POST + GET stream, fresh": _spec("fresh", 1, False, 600.0),
    "POST + GET stream, keep": _spec("keep", 1, False, 600.0),
    "one-call POST, fresh": _spec("fresh", 1, True, 600.0),
    "one-call POST, keep": _spec("keep", 1, True, 600.0),
    "POST + GET stream, fresh, 32": _spec("fresh", 32, False, 600.0),
    "POST + GET stream, keep, 32": _spec("keep", 32, False, 600.0),
}


_started = 0


def _start(store: str) -> subprocess.Popen[str]:
    global _started
    _started += 1
    if store.startswith("sqlite:"):
        store = f"{store}.{_started}"  # a new file for each server
    argv = [sys.executable, "-m", "benchmarks.bench_http", "--serve", "--count"]
    return subprocess.Popen(
        [*argv, "--store", store],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def counts(jobs: int, store: str, verbose: bool = False) -> None:
    print(f"scheduler work per job, {jobs} jobs, 1 client, store {store.split(':')[0]}")
    print(f"  {'scenario':<28} {'tasks':>7} {'steps':>7} {'io waits':>9} {'CPU us':>8}")
    for name, spec in SCENARIOS.items():
        proc = _start(store)
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        server = Server(name, url, proc.pid, True)
        _until_listening(server)
        cpu0 = _cpu_s(proc.pid)
        run = load(server, {**spec, "max_jobs": max(1, jobs // spec["clients"])})
        cpu = _cpu_s(proc.pid) - cpu0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        got = json.loads(out.strip().splitlines()[-1])
        n = run.jobs
        print(
            f"  {name:<28} {got['tasks'] / n:7.1f} {got['steps'] / n:7.1f} "
            f"{got['io_waits'] / n:9.1f} {cpu / n * 1e6:8.0f}",
            flush=True,
        )
        if verbose:
            for task, (spawned, steps) in got["by_task"].items():
                print(f"      {task:<40} spawned {spawned / n:5.2f}  steps {steps / n:5.1f}")


def _package(frame: str) -> str:
    path = frame.rsplit("(", 1)[-1]
    for key in ("trio_jobs", "hypercorn", "h11", "quart_trio", "quart", "werkzeug", "trio"):
        if f"/{key}/" in path or f"{key}/" in path.split("site-packages/")[-1][: len(key) + 1]:
            return key
    if "pydantic" in path:
        return "pydantic"
    if "prometheus" in path:
        return "prometheus"
    if "python3.11" in path:
        return "stdlib"
    return "other"


def spy(out: Path, seconds: float, store: str, one_call: bool) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = _start(store)
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[-1]
    server = Server("trio-jobs", url, proc.pid, True)
    _until_listening(server)
    recorder = subprocess.Popen(
        [py_spy, "record", "--format", "raw", "-o", str(out), "-r", "500", "-p", str(proc.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    run = load(server, _spec("fresh", 32, one_call, seconds), 2)
    recorder.send_signal(signal.SIGINT)
    recorder.wait(30)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    print(f"py-spy, 32 clients, fresh, {'one-call' if one_call else 'two-step'}: {run.rate:.0f}")
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        total += int(n)
        own[_package(frames[-1])] += int(n)
    for key, samples in own.most_common():
        print(f"  {key:<12} {samples / total:6.1%} of samples (self time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--store", default="memory", choices=["memory", "sqlite"])
    parser.add_argument("--py-spy", type=Path, default=None, help="collapsed stacks file")
    parser.add_argument("--one-call", action="store_true", help="py-spy: the one-call POST")
    parser.add_argument("--by-task", action="store_true", help="counts per task name")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = "memory" if args.store == "memory" else f"sqlite:{tmp}/jobs.sqlite"
        counts(args.jobs, store, args.by_task)
        if args.py_spy is not None:
            spy(args.py_spy, 5.0, store, args.one_call)


if __name__ == "__main__":
    main()
