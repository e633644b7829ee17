"""A job server and its client in one program: ``create_app`` + ``serve`` + ``JobClient``.

The server runs on 127.0.0.1 on a free port; the client submits a job, prints every wire
line of its SSE stream until ``[DONE]``, then the program stops the server gracefully.

Run: ``python examples/http_job.py``
"""

from __future__ import annotations

from typing import Any

import trio

import trio_jobs
from trio_jobs import JobClient
from trio_jobs.http import create_app, serve


async def greet(job_id: str, payload: Any) -> None:
    """Narrate a greeting for each name in the payload."""
    names = payload.get("names", [])
    for done, name in enumerate(names, start=1):
        await trio.sleep(0.01)
        trio_jobs.narrate("greet", f"Hello, {name}!", progress={"done": done, "total": len(names)})


async def main() -> None:
    registry = trio_jobs.JobRegistry(actor="greeter")
    app = create_app(registry, greet, name="greeter")
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(serve, app)
        print(f"serving on {base_url}")
        async with JobClient(base_url) as client:
            job_id = await client.submit_and_stream(
                {"names": ["queen", "hive", "worker"]}, print, timeout_s=10
            )
            record = await client.get(job_id)
            print(f"{job_id} ended {record['state']}")
        nursery.cancel_scope.cancel()  # serve() stops gracefully when cancelled


if __name__ == "__main__":
    trio.run(main)
