"""Worker processes as real children of the hive, supervised in the hive's nursery."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from trio_jobs import narrate

from .._daemon import LISTENING_PREFIX
from .._proc import drain, read_first_line, terminate
from ..operations import WorkerSpawn

__all__ = ["WorkerProcess", "WorkerStartError", "WorkerSupervisor", "UnknownWorker"]

logger = logging.getLogger("servers.hive")


class WorkerStartError(Exception):
    """A worker process did not come up (exited, printed no address, or never got healthy)."""


class UnknownWorker(LookupError):
    """No worker with that id on this hive."""

    def __init__(self, worker_id: str, known: list[str]) -> None:
        names = ", ".join(known) or "none"
        super().__init__(f"unknown worker {worker_id!r} (workers on this hive: {names})")


@dataclass
class WorkerProcess:
    """What the hive knows about one worker process.

    ``state`` is ``starting``, ``ready``, ``stopping``, ``exited`` (stopped on request, or
    it ended on its own with code 0, e.g. after a SIGTERM from elsewhere) or ``crashed``
    (it ended on its own with another code).
    """

    id: str
    model: str
    backend: str
    worker: str
    device: int
    state: str = "starting"
    pid: int | None = None
    url: str | None = None
    port: int | None = None
    returncode: int | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    process: trio.Process | None = field(default=None, repr=False)
    stop_requested: bool = False
    ended: trio.Event = field(default_factory=trio.Event, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "backend": self.backend,
            "worker": self.worker,
            "device": self.device,
            "state": self.state,
            "pid": self.pid,
            "port": self.port,
            "url": self.url,
            "returncode": self.returncode,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


async def _wait_up(url: str, *, interval_s: float = 0.05) -> dict[str, Any]:
    """Poll the worker's ``GET /health`` until it answers for itself: 200 (ready) or 503
    with its state (up, but e.g. its upstream is unreachable). The caller bounds the time."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
        while True:
            try:
                response = await client.get(f"{url}/health")
                data = response.json()
                if response.status_code == 200 or (
                    response.status_code == 503 and isinstance(data, dict) and "state" in data
                ):
                    return dict(data)
            except (httpx.HTTPError, ValueError) as exc:
                logger.debug("%s/health not answering yet: %s", url, exc)
            await trio.sleep(interval_s)


class WorkerSupervisor:
    """Starts, watches and stops worker processes.

    Each worker is a task in ``nursery`` (the hive's long-lived nursery, not a job's): it
    starts the process, reads its ``listening on`` line, waits for ``/health``, then waits
    for the process to end and records how it ended. Whatever happens to that task, the
    process does not outlive it.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        hive_id: str,
        queen_url: str | None = None,
        worker_host: str = "127.0.0.1",
        startup_timeout_s: float = 30.0,
        grace_s: float = 5.0,
        heartbeat_s: float = 1.0,
        token: str | None = None,
    ) -> None:
        self._nursery = nursery
        self.hive_id = hive_id
        self.queen_url = queen_url
        self.worker_host = worker_host
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.heartbeat_s = heartbeat_s
        self.token = token
        self.workers: dict[str, WorkerProcess] = {}

    def get(self, worker_id: str) -> WorkerProcess:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise UnknownWorker(worker_id, list(self.workers)) from None

    def all(self) -> list[WorkerProcess]:
        """Every worker the hive knows, in spawn order."""
        return list(self.workers.values())

    def command(self, worker_id: str, op: WorkerSpawn) -> list[str]:
        """The worker's command line."""
        cmd = [
            sys.executable,
            "-m",
            "servers.worker",
            "--host",
            self.worker_host,
            "--port",
            "0",
            "--worker-id",
            worker_id,
            "--model",
            op.model,
            "--backend",
            op.backend,
            "--hive-id",
            op.hive_id,  # the alias the queen knows this hive by
            "--parent-pid",
            str(os.getpid()),
            "--heartbeat-s",
            f"{self.heartbeat_s:g}",
            # Half the SIGKILL grace for its jobs, the rest to end their streams and exit.
            "--stop-grace",
            f"{self.grace_s / 2:g}",
        ]
        queen = op.queen_url or self.queen_url
        if queen:
            cmd += ["--queen", queen]
        if op.upstream_url:
            cmd += ["--upstream-url", op.upstream_url]
        if op.token_delay_s is not None:
            cmd += ["--token-delay", f"{op.token_delay_s:g}"]
        if op.max_concurrent is not None:
            cmd += ["--max-concurrent", str(op.max_concurrent)]
        return cmd

    async def spawn(self, op: WorkerSpawn) -> WorkerProcess:
        """Start a worker and return once it answers ``/health``.

        Raises:
            WorkerStartError: it exited, printed no address, or stayed unhealthy past the
                startup timeout. Cancelling the caller stops the process.
        """
        worker_id = f"worker-{uuid.uuid4().hex[:8]}"
        record = WorkerProcess(worker_id, op.model, op.backend, op.worker, op.device)
        self.workers[worker_id] = record
        try:
            started: WorkerProcess = await self._nursery.start(
                self._supervise, record, self.command(worker_id, op)
            )
        except BaseException:
            self.workers.pop(worker_id, None)
            raise
        return started

    async def _supervise(
        self,
        record: WorkerProcess,
        cmd: list[str],
        task_status: trio.TaskStatus[WorkerProcess] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.token:
            env["TRIO_JOBS_TOKEN"] = self.token
        process = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env
        )
        record.process = process
        record.pid = process.pid
        narrate(
            "worker_process",
            f"Started worker {record.id} (pid {process.pid}) for model {record.model}",
            worker_id=record.id,
            pid=process.pid,
        )
        assert process.stdout is not None
        try:
            with trio.move_on_after(self.startup_timeout_s) as startup:
                line = await read_first_line(process.stdout)
                if line is None or not line.startswith(LISTENING_PREFIX):
                    code = await process.wait()
                    raise WorkerStartError(
                        f"worker {record.id} exited with code {code} before listening"
                        if line is None
                        else f"worker {record.id} printed {line!r} instead of its address"
                    )
                url = line[len(LISTENING_PREFIX) :].strip()
                record.url = url
                record.port = urlsplit(url).port
                narrate("worker_listening", f"Worker {record.id} listening on {url}", url=url)
                health = await _wait_up(url)
                if health.get("problem"):
                    narrate(
                        "worker_not_ready",
                        f"Worker {record.id} is up but not ready: {health['problem']}",
                        problem=health["problem"],
                    )
            if startup.cancelled_caught:
                raise WorkerStartError(
                    f"worker {record.id} not healthy within {self.startup_timeout_s:g}s"
                )
            record.state = "ready"
            task_status.started(record)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, process.stdout)
                await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            code = await terminate(process, self.grace_s)
            record.returncode = code
            record.ended_at = time.time()
            record.state = "exited" if record.stop_requested or code == 0 else "crashed"
            if record.state == "crashed":
                logger.warning("worker %s (pid %s) ended with code %s", record.id, record.pid, code)
            else:
                logger.info("worker %s (pid %s) stopped with code %s", record.id, record.pid, code)
            record.process = None
            record.ended.set()

    async def stop(self, worker_id: str) -> WorkerProcess:
        """Stop a worker (SIGTERM, SIGKILL after the grace) and forget it."""
        record = self.get(worker_id)
        if record.process is not None and record.returncode is None:
            record.stop_requested = True
            record.state = "stopping"
            narrate(
                "worker_stop",
                f"Sending SIGTERM to worker {worker_id} (pid {record.pid}); "
                f"SIGKILL after {self.grace_s:g}s",
                worker_id=worker_id,
                pid=record.pid,
            )
            await terminate(record.process, self.grace_s)
            with trio.CancelScope(shield=True), trio.move_on_after(self.grace_s):
                await record.ended.wait()
        self.workers.pop(worker_id, None)
        return record

    async def stop_all(self) -> None:
        """Stop every worker at once (the hive is shutting down)."""
        async with trio.open_nursery() as nursery:
            for worker_id, record in list(self.workers.items()):
                if record.process is not None:
                    nursery.start_soon(self.stop, worker_id)
