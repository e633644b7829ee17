"""Shared benchmark helpers: wall-clock timing, RSS reading, report lines."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Sequence
from typing import Any

now = time.perf_counter


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def best_of(values: Sequence[float]) -> float:
    return max(values)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(name: str, figure: str, ratio: float | None = None, target: str = "") -> None:
    """Print one benchmark line: name, figure, ratio to its same-run baseline, target."""
    parts = [f"{name:<48}", f"{figure:>26}"]
    if ratio is not None:
        parts.append(f"ratio {ratio:6.2f}x")
    if target:
        parts.append(f"(target {target})")
    print("  ".join(parts), flush=True)


def stop(proc: subprocess.Popen[Any]) -> None:
    """End a server process: SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
