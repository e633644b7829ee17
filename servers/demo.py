"""``python -m servers.demo``: a queen, a hive and a worker on loopback, one inference.

Starts a hive and a queen as real processes on free ports, asks the queen to spawn a
worker on the hive (``worker_spawn``), then runs an ``infer`` through the queen and streams
the tokens to the terminal until ``[DONE]``. Finally it stops the daemons with SIGTERM (the
hive stops its worker) and exits 0 only if every job ended ``[DONE]`` and every daemon
exited cleanly. Daemon logs and job stores (SQLite files, the daemons' default) go to a
temporary directory; the logs are shown if anything failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from trio_jobs import JobClient, JobFailed, NarrationEvent, TerminalSignal, TrioJobsError

from ._launch import Daemon, running_daemon
from .cli import Printer
from .operations import Infer, WorkerSpawn

__all__ = ["run_demo", "main"]


async def _follow(client: JobClient, body: dict[str, Any], printer: Printer) -> None:
    """Submit ``body`` and print its stream to the terminal signal (raises on failure)."""
    job_id = await client.submit(body, timeout_s=30)
    async with client.stream(job_id) as events:
        async for item in events:
            if isinstance(item, NarrationEvent | TerminalSignal):
                printer.item(item)
        events.check()


async def run_demo(prompt: str, max_tokens: int, logs: Path) -> int:
    """Run the whole demo; returns the process exit code."""
    printer = Printer(json_lines=False)
    started = time.perf_counter()
    ok = True
    daemons: list[Daemon] = []
    with (
        (logs / "hive.log").open("wb") as hive_log,
        (logs / "queen.log").open("wb") as queen_log,
    ):
        hive_argv = [
            "hive",
            "--port",
            "0",
            "--models-dir",
            str(logs / "models"),
            "--heartbeat-s",
            "0.5",
            "--state-dir",
            str(logs / "state"),
        ]
        async with running_daemon(hive_argv, stderr=hive_log) as hive:
            daemons.append(hive)
            print(f"hive  listening on {hive.url} (pid {hive.pid})")
            queen_argv = ["queen", "--port", "0", "--hive", f"localhost={hive.url}"]
            queen_argv += ["--state-dir", str(logs / "state")]
            async with running_daemon(queen_argv, stderr=queen_log) as queen:
                daemons.append(queen)
                print(f"queen listening on {queen.url} (pid {queen.pid})")
                async with JobClient(queen.url) as client:
                    try:
                        print("\n$ trio-jobs worker-spawn --model tiny")
                        spawn = WorkerSpawn(model="tiny", token_delay_s=0.01)
                        await _follow(client, spawn.to_body(), printer)
                        print(f"\n$ trio-jobs infer --model tiny {prompt!r}")
                        infer = Infer(model="tiny", prompt=prompt, max_tokens=max_tokens)
                        await _follow(client, infer.to_body(), printer)
                    except (JobFailed, TrioJobsError) as exc:
                        print(f"demo: job failed: {exc}", file=sys.stderr)
                        ok = False
                print("\nstopping the queen and the hive (SIGTERM)...")
                queen_code = await queen.stop()
            hive_code = await hive.stop()
    print(f"queen exited with {queen_code}, hive exited with {hive_code}")
    if queen_code != 0 or hive_code != 0:
        ok = False
    print(f"demo {'finished' if ok else 'FAILED'} in {time.perf_counter() - started:.1f}s")
    if not ok:
        for name in ("hive", "queen"):
            text = (logs / f"{name}.log").read_text(errors="replace")
            print(f"--- {name} log (last lines) ---\n{text[-3000:]}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.demo", description=__doc__)
    parser.add_argument("--prompt", default="Structured concurrency makes job systems")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trio-jobs-demo-") as tmp:
        code: int = trio.run(run_demo, args.prompt, args.max_tokens, Path(tmp))
    return code


if __name__ == "__main__":
    sys.exit(main())
