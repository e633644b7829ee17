"""Schemathesis fuzzes the job API from its own ``/openapi.json``, through a real socket.

The schemathesis CLI runs as a child process against a real server, with every check
on: no 500; documented status codes, content types and headers; responses (SSE events
one by one) matching their schemas; schema-valid requests accepted and schema-violating
ones rejected. Its phases are boundary values ("coverage"), random requests ("fuzzing")
and scenarios that follow the document's links (submit, then read, stream, cancel,
list). The WebSocket operation is left out: schemathesis speaks plain HTTP. So is the
``use_after_free`` check: ``DELETE /v1/jobs/{id}`` cancels a job, whose record and stream
stay readable.

Two servers: a plain job app (any JSON object is a payload) served from a thread, and a
real queen process, whose POST body is the union of the daemon operations.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from trio_jobs import JobRegistry, narrate
from trio_jobs.http import create_app

from .daemons import Cluster
from .helpers import serving_in_a_thread


async def executor(job_id: str, payload: Any) -> None:
    """Three events; ``{"fail": "msg"}`` fails, ``{"hold": true}`` runs for a minute."""
    for i in range(3):
        narrate("step", f"step {i}", seq=i)
    if isinstance(payload, dict):
        if payload.get("hold") is True:
            await trio.sleep(60)
        if isinstance(payload.get("fail"), str):
            raise RuntimeError(payload["fail"])


def run_schemathesis(url: str, cwd: Path, max_examples: int) -> str:
    """Run the schemathesis CLI against ``url``; its report, checked to be clean."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "use_after_free",
            "--phases",
            "coverage,fuzzing,stateful",
            "--max-examples",
            str(max_examples),
            "--seed",
            "1",
            "--exclude-operation-id",
            "streamJobWebSocket",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            "--no-color",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "Operations:       8 selected / 9 total" in result.stdout, report
    generated = re.search(r"(\d+) generated, (\d+) passed\n", result.stdout)
    assert generated is not None and generated[1] == generated[2], report
    assert int(generated[1]) > 300, report
    return result.stdout


def test_schemathesis_finds_nothing_in_the_job_api(tmp_path: Path) -> None:
    app = create_app(JobRegistry(retention=60.0), executor, max_body_bytes=16_384)
    with serving_in_a_thread(app) as url:
        run_schemathesis(url, tmp_path, max_examples=40)


def test_schemathesis_finds_nothing_in_the_queen(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    try:
        url = cluster.start("queen", ["queen", "--port", "0", "--store", "memory"])
        run_schemathesis(url, tmp_path, max_examples=25)
    finally:
        codes = cluster.close()
    assert codes == {"queen": 0}
