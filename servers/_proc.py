"""Child processes: reading their address line, draining stdout, health, stopping."""

from __future__ import annotations

import logging
import signal
from typing import Any

import httpx
import trio

__all__ = ["drain", "read_first_line", "terminate", "wait_healthy"]

logger = logging.getLogger("servers")


async def read_first_line(stream: trio.abc.ReceiveStream, limit: int = 4096) -> str | None:
    """The first line a child prints, or None if its stdout closed first."""
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = await stream.receive_some(1024)
        if not chunk:
            return None
        buffer += chunk
        if len(buffer) > limit:
            break
    return bytes(buffer).split(b"\n", 1)[0].decode(errors="replace").strip()


async def drain(stream: trio.abc.ReceiveStream) -> None:
    """Keep reading a child's stdout so it can never block on a full pipe."""
    while True:
        if not await stream.receive_some(65536):
            return


async def wait_healthy(url: str, *, interval_s: float = 0.05) -> dict[str, Any]:
    """Poll ``GET /health`` until it answers 200 (the caller bounds the time)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
        while True:
            try:
                response = await client.get(f"{url}/health")
                if response.status_code == 200:
                    data: dict[str, Any] = response.json()
                    return data
            except httpx.HTTPError as exc:
                logger.debug("%s/health not answering yet: %s", url, exc)
            await trio.sleep(interval_s)


async def terminate(process: trio.Process, grace_s: float) -> int:
    """SIGTERM, then SIGKILL if it is still running after ``grace_s``; returns its code.

    Runs shielded: a cancel of the caller does not leave the child running.
    """
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_s):
                await process.wait()
            if process.returncode is None:
                logger.warning("pid %d ignored SIGTERM for %.1fs; SIGKILL", process.pid, grace_s)
                process.kill()
        code = await process.wait()
    return code
