"""Work per job that a busy machine cannot blur: instructions and syscalls of a server.

Timings on a shared 2-core machine move with everything else it runs; these counts do
not. For each server (the trio-jobs bench server, ``bench_http --serve``, and the asyncio
peer) and each scenario:

- **instructions per job** (user space): the server under ``valgrind --tool=callgrind``
  takes ``--jobs`` jobs from the raw client; a second server that takes none gives the
  start-up and shut-down cost, which is subtracted. The same tree, inputs and scenario
  give the same count whatever else the machine does.
- **syscalls per job**: ``strace -c -f`` attached to a running server for ``--jobs`` jobs,
  by name (those made at least once every 20 jobs).

The kernel's own work per syscall is not counted, so compare syscall counts beside the
instruction counts. With ``TRIO_JOBS_BASELINE=<another checkout>`` its server is counted
too. Needs ``valgrind`` and ``strace`` (Debian packages of the same names).

Run: ``python -m benchmarks.count_http [--jobs N] [--scenarios fresh:1,fresh:32,keep:32]
[--no-strace]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_http import REPO, _peer_path
from .bench_http_raw import Server, _spec, _until_listening, load


def _argv(server: str) -> tuple[list[str], Path]:
    """The command of ``server`` (``trio-jobs``, ``trio-jobs@base``, ``peer``) and its cwd."""
    if server == "peer":
        return [sys.executable, str(_peer_path()), "--port", "0"], REPO
    tree = Path(os.environ["TRIO_JOBS_BASELINE"]) if server.endswith("@base") else REPO
    return [sys.executable, "-m", "benchmarks.bench_http", "--serve", "--store", "memory"], tree


def _start(argv: list[str], cwd: Path) -> tuple[subprocess.Popen[str], Server]:
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(cwd)},
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().split()[-1]
    server = Server("server", url, proc.pid, True)
    _until_listening(server)
    return proc, server


def _drive(server: Server, jobs: int, mode: str, clients: int) -> None:
    if jobs:
        load(server, {**_spec(mode, clients, False, 600.0), "max_jobs": jobs // clients})


def instructions(name: str, jobs: int, mode: str, clients: int) -> float:
    """User-space instructions per job of ``name`` (callgrind, N jobs minus none)."""
    argv, cwd = _argv(name)
    totals = []
    for count in (0, jobs):
        with tempfile.TemporaryDirectory(prefix="count-http-") as tmp:
            out = Path(tmp) / "callgrind.out"
            valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
            proc, server = _start([*valgrind, *argv], cwd)
            _drive(server, count, mode, clients)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=600)
            total = 0
            for line in out.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
            totals.append(total)
    return (totals[1] - totals[0]) / jobs


def syscalls(name: str, jobs: int, mode: str, clients: int) -> dict[str, float]:
    """Syscalls per job of ``name`` by name (strace -c attached while it serves)."""
    argv, cwd = _argv(name)
    proc, server = _start(argv, cwd)
    with tempfile.TemporaryDirectory(prefix="count-http-") as tmp:
        out = Path(tmp) / "strace.out"
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(out), "-p", str(proc.pid)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # attached to every thread before the load
        _drive(server, jobs, mode, clients)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        counts: dict[str, float] = {}
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                counts[parts[-1]] = int(parts[3]) / jobs
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=320)
    parser.add_argument("--scenarios", default="fresh:1,fresh:32,keep:32")
    parser.add_argument("--no-strace", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("valgrind", *(() if args.no_strace else ("strace",))):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install {tool})")
    names = ["trio-jobs", *(["trio-jobs@base"] if "TRIO_JOBS_BASELINE" in os.environ else [])]
    names.append("peer")
    scenarios = [(mode, int(n)) for mode, n in (s.split(":") for s in args.scenarios.split(","))]
    print(f"instructions per job (user space, callgrind), {args.jobs} jobs; ratio to the peer")
    for mode, clients in scenarios:
        counts = {name: instructions(name, args.jobs, mode, clients) for name in names}
        for name in names:
            print(
                f"  {mode} x{clients:<3} {name:<16} {counts[name] / 1e6:7.2f}M"
                f"  {counts[name] / counts['peer']:5.2f}x",
                flush=True,
            )
    if args.no_strace:
        return
    print(f"syscalls per job (strace -c), {args.jobs} jobs")
    for mode, clients in scenarios:
        for name in names:
            counts = syscalls(name, args.jobs, mode, clients)
            top = ", ".join(
                f"{call} {n:.1f}"
                for call, n in sorted(counts.items(), key=lambda kv: -kv[1])
                if n >= 0.05
            )
            print(f"  {mode} x{clients:<3} {name:<16} {sum(counts.values()):6.1f}: {top}")


if __name__ == "__main__":
    main()
