"""The queen daemon: routes operations, forwards to hives, schedules ``infer`` on workers."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import trio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trio_jobs import (
    JobRegistry,
    JobStore,
    JobTimeout,
    narrate,
    run_persistence,
    run_shared_jobs,
    timeout_message,
)
from trio_jobs.http import ApiError, create_app, validation_detail

from .._daemon import is_loopback, run_daemon
from .._proc import drain, read_first_line, terminate, wait_healthy
from .._store import default_state_dir, make_store, start_store
from .._ui import add_ui_routes
from ..operations import (
    HiveGet,
    HiveImportSsh,
    HiveInstall,
    HiveList,
    HiveRefreshCapabilities,
    HiveStart,
    HiveStatus,
    HiveStop,
    HiveUninstall,
    Infer,
    OperationBase,
    SshTest,
    Status,
    WorkerSpawn,
    operation_schema,
    parse_operation,
)
from ._cluster import ClusterBook
from ._config import HiveEntry, QueenConfig, read_config
from ._forward import ForwardFailed, forward_job
from ._openai import add_openai_routes
from ._scheduler import NoWorker, WorkerEntry, WorkersBusy, WorkerTable

__all__ = [
    "Queen",
    "make_registry",
    "parse_queen_payload",
    "serve_queen",
    "hive_argv",
    "parse_ssh_config",
    "remote_hive_command",
]

logger = logging.getLogger("servers.queen")

_M = TypeVar("_M", bound=BaseModel)

_MAX_FAILOVERS = 8
"""Workers one ``infer`` tries when its request reaches none of them."""


def _validated(model: type[_M], data: Any) -> _M:
    """A daemon route's JSON body as ``model``: 400 when it is not a JSON object, 422 naming
    the fields otherwise (the same error shape as the job endpoints)."""
    if not isinstance(data, dict):
        raise ApiError(400, "malformed JSON", "a JSON object is required")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid request", validation_detail(exc.errors())) from None


class NotSupported(Exception):
    """An operation this queen cannot carry out here; the message starts ``not supported:``."""

    def __init__(self, what: str) -> None:
        super().__init__(f"not supported: {what}")


class HiveRegistration(BaseModel):
    """What a hive started with ``--queen`` announces once to ``POST /v1/hives``."""

    model_config = ConfigDict(extra="ignore")

    alias: str = Field(min_length=1, max_length=128)
    url: str = Field(pattern=r"^https?://")


class Heartbeat(BaseModel):
    """What a worker reports to ``POST /v1/workers/heartbeat``."""

    model_config = ConfigDict(extra="ignore")

    worker_id: str = Field(min_length=1)
    url: str = Field(pattern=r"^https?://")
    model: str = Field(min_length=1)
    hive_id: str | None = None
    pid: int | None = None
    state: str = "ready"
    running: int = 0
    backend: str | None = None
    capacity: int | None = Field(default=None, ge=1)
    """Jobs the worker runs at once (its ``max_concurrent``); None: no limit."""


def make_registry(store: JobStore | None = None, retention_s: float = 600.0) -> JobRegistry:
    """The queen's job registry, persisted to ``store`` when one is given."""
    return JobRegistry(actor="queen", retention=retention_s, store=store)


def parse_queen_payload(body: Any) -> dict[str, Any]:
    """Validate a queen job body into a known operation (422 naming the field otherwise)."""
    return parse_operation(body).to_body()


def parse_ssh_config(text: str) -> list[tuple[str, str]]:
    """``(alias, hostname)`` for each concrete ``Host`` of an OpenSSH config (no wildcards)."""
    hosts: list[tuple[str, str]] = []
    current: list[str] = []
    names: dict[str, str] = {}

    def flush() -> None:
        for alias in current:
            hosts.append((alias, names.get(alias, alias)))

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.replace("=", " ", 1).partition(" ")
        key, value = key.lower(), value.strip()
        if key == "host":
            flush()
            current = [a for a in value.split() if not any(c in a for c in "*?!")]
        elif key == "hostname":
            for alias in current:
                names[alias] = value
    flush()
    return hosts


def hive_argv(
    entry: HiveEntry,
    bind: str,
    queen_url: str | None,
    config: str | None = None,
    state_dir: str | None = None,
    models_dir: str | None = None,
) -> list[str]:
    """The ``trio-jobs`` arguments that start the hive of ``entry`` bound to ``bind`` (its
    token goes in ``$TRIO_JOBS_TOKEN``, never on the command line)."""
    argv = ["hive", "--host", bind, "--port", str(urlsplit(entry.url).port or 7834)]
    argv += ["--hive-id", entry.alias]
    for flag, value in (
        ("--queen", queen_url),
        ("--config", config),
        ("--state-dir", state_dir),
        ("--models-dir", models_dir),
    ):
        if value is not None:
            argv += [flag, value]
    return argv


def remote_hive_command(argv: list[str]) -> str:
    """The command run over SSH to start ``trio-jobs <argv>`` in the background: a POSIX
    ``sh`` script (whatever the login shell) that reads the token from its first input
    line into ``$TRIO_JOBS_TOKEN``, so it shows in neither ``ps`` nor the narration."""
    script = (  # not one and-or list: "&" would run the read in the background too
        "IFS= read -r TRIO_JOBS_TOKEN || exit 1; export TRIO_JOBS_TOKEN; "
        f"nohup {shlex.join(['trio-jobs', *argv])} </dev/null >/dev/null 2>&1 &"
    )
    return f"sh -c {shlex.quote(script)}"


class Queen:
    """The queen's state (hives, worker heartbeats, hives it started) and its executor."""

    def __init__(self, config: QueenConfig, registry: JobRegistry, nursery: trio.Nursery) -> None:
        self.config = config
        self.registry = registry
        self.workers = WorkerTable(config.heartbeat_ttl_s)
        self.url: str | None = config.advertise_url
        self._nursery = nursery
        self._started_hives: dict[str, trio.Process] = {}
        self.book: ClusterBook | None = None
        """Where hives (and, shared, workers) are kept in the store; None without one."""

    async def keep_hive(self, entry: HiveEntry, source: str) -> None:
        """Record a registered or imported hive in the store (so it outlives a restart and
        other queens on the store know it); if the store cannot take it now, it is
        written once it can."""
        if self.book is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self.book.save_hive(entry, source)
        except Exception as exc:
            logger.warning("hive %s is not stored yet (%s); retrying", entry.alias, exc)
            self.book.keep_hive(entry, source)

    # ---- routing ------------------------------------------------------------------------

    async def execute(self, job_id: str, payload: Any) -> None:
        op = parse_operation(payload)
        narrate("route_job", f"Executing operation: {op.operation}", operation=op.operation)
        if isinstance(op, Infer):
            await self.infer(op, job_id)
        elif isinstance(op, Status):
            await self.status()
        elif op.should_forward_to_hive():
            await self.forward_to_hive(op)
        elif isinstance(op, HiveList):
            if self.book is not None:  # hives another queen registered a moment ago too
                await self.book.read_hives()
            hives = [h.to_dict() for h in self.config.hives.values()]
            narrate(
                "hive_list",
                f"{len(hives)} hive(s)" + "".join(f"\n  {h['alias']} {h['url']}" for h in hives),
                hives=hives,
            )
        elif isinstance(op, HiveGet):
            entry = self.hive(op.alias)
            narrate("hive_get", f"{entry.alias}: {entry.url}", hive=entry.to_dict())
        elif isinstance(op, HiveStatus | HiveRefreshCapabilities):
            await self.hive_status(op.alias)
        elif isinstance(op, HiveImportSsh):
            await self.import_ssh(op)
        elif isinstance(op, SshTest):
            await self.ssh_test(op.alias)
        elif isinstance(op, HiveStart):
            await self.hive_start(op)
        elif isinstance(op, HiveStop):
            await self.hive_stop(op.alias)
        elif isinstance(op, HiveInstall | HiveUninstall):
            host = self.hive(op.alias).ssh_host or op.alias
            verb = "install" if isinstance(op, HiveInstall) else "uninstall"
            raise NotSupported(
                f"{op.operation}: {verb} trio-jobs on {host} with pip "
                f"(`pip {verb} trio-jobs`) and start it with `trio-jobs hive`"
            )
        else:
            raise NotSupported(f"operation {op.operation}")

    def hive(self, alias: str) -> HiveEntry:
        try:
            return self.config.hives[alias]
        except KeyError:
            known = ", ".join(sorted(self.config.hives)) or "none configured"
            raise LookupError(f"unknown hive {alias!r} (known hives: {known})") from None

    # ---- forwarding -----------------------------------------------------------------------

    async def forward_to_hive(self, op: OperationBase) -> None:
        hive_id = getattr(op, "hive_id", None) or "localhost"
        entry = self.hive(hive_id)
        body = op.to_body()
        if isinstance(op, WorkerSpawn) and op.queen_url is None and self.url is not None:
            body["queen_url"] = self.url
        narrate("forward_to_hive", f"Forwarding {op.operation} to hive {hive_id} at {entry.url}")
        await forward_job(
            self.registry,
            entry.url,
            body,
            what=f"hive {hive_id!r}",
            token=entry.token or self.config.token,
            cancel_timeout_s=self.config.cancel_timeout_s,
            silence_s=self.config.stream_silence_s,
        )

    async def infer(self, op: Infer, job_id: str | None = None) -> None:
        """Run ``op`` (of job ``job_id``) on the least busy live worker of its model that
        has room for it.

        Scheduling waits up to ``schedule_wait_s`` for a live worker of the model below
        its advertised capacity (jobs this queen has in flight there plus what it ran for
        others at its last heartbeat), in turn with the other jobs waiting for one; then
        the job fails, narrating ``infer_unscheduled`` (``busy``: workers serve the
        model, all at capacity). A background infer (``op.background``: an OpenAI
        background response) waits instead as long as its job's bound allows: its
        timeout counted from the job's creation, so the bound ends at the same time
        whatever attempt runs (after a queen restart too); at the bound the job fails
        ``Job timed out after <N>s`` (narrating ``infer_unscheduled`` first if no worker
        took it), and without a timeout it waits until it is cancelled.

        A request that reached no worker (connection refused or reset, a 5xx refusal:
        no job id came back) is tried on the next live worker before the job fails; the
        worker that failed is not picked again until it heartbeats. A request that did
        reach one is never sent again here (the job's retry policy decides). A worker that
        stops heartbeating (or whose stream stays silent, see ``stream_silence_s``) fails
        the job with ``lost worker ...`` within the TTL plus ``lost_worker_grace_s``.
        """
        narrate(
            "infer_schedule",
            f"Scheduling inference for model {op.model}",
            model=op.model,
            max_tokens=op.max_tokens,
        )
        record = self.registry.get(job_id) if op.background and job_id is not None else None
        if record is None or record.timeout is None:
            await self._schedule(op, math.inf if op.background else self.config.schedule_wait_s)
            return
        timeout = record.timeout
        taken: list[WorkerEntry] = []
        start = trio.current_time()
        with trio.move_on_after(max(0.0, record.created_at + timeout - time.time())) as bound:
            await self._schedule(op, math.inf, taken)
        if bound.cancelled_caught:
            if not taken:
                waited = round(trio.current_time() - start, 1)
                why = self.workers.unavailable(op.model, op.hive_id, waited)
                busy = isinstance(why, WorkersBusy)
                narrate("infer_unscheduled", str(why), model=op.model, busy=busy)
            raise JobTimeout(timeout_message(timeout), job_id=job_id)

    async def _schedule(
        self, op: Infer, wait_s: float, taken: list[WorkerEntry] | None = None
    ) -> None:
        """Take a slot for ``op`` (waiting up to ``wait_s``) and run it there, failing over
        to another worker when the request reached none (see :meth:`infer`); each worker
        taken is appended to ``taken``."""
        failed = ""
        for _ in range(_MAX_FAILOVERS):
            try:
                worker = await self.workers.take(op.model, op.hive_id, wait_s)
            except NoWorker as exc:
                if not failed:  # the first pick: nothing else went wrong
                    narrate(
                        "infer_unscheduled",
                        str(exc),
                        model=op.model,
                        busy=isinstance(exc, WorkersBusy),
                    )
                    raise
                raise ForwardFailed(f"{failed} (and {exc})") from None
            if taken is not None:
                taken.append(worker)
            try:
                narrate(
                    "infer_worker",
                    f"Scheduled to worker {worker.worker_id} at {worker.url}",
                    worker_id=worker.worker_id,
                    url=worker.url,
                )
                await self._infer_on(worker, op)
                return
            except ForwardFailed as exc:
                if exc.lost_contact or exc.try_elsewhere:  # not again until it heartbeats
                    self.workers.forget(worker.worker_id)
                if not exc.try_elsewhere:
                    raise
                failed = str(exc)
            finally:
                self.workers.release(worker.worker_id)
            logger.warning("infer: %s; trying another worker", failed)
            narrate("infer_failover", f"{failed}; trying another worker", error=failed)
            if not op.background:  # a background one waits its turn again
                wait_s = 0.0
        raise ForwardFailed(f"{failed} (gave up after {_MAX_FAILOVERS} workers)")

    async def _infer_on(self, worker: WorkerEntry, op: Infer) -> None:
        """Forward ``op`` to ``worker``, watching its heartbeats."""
        await forward_job(
            self.registry,
            worker.url,
            op.model_copy(update={"background": False}).to_body(),  # the queen's own
            what=f"worker {worker.worker_id}",
            token=self.config.token,
            cancel_timeout_s=self.config.cancel_timeout_s,
            watch=partial(self._until_silent, worker.worker_id),
            silence_s=self.config.stream_silence_s,
        )

    async def _until_silent(self, worker_id: str) -> str:
        """Return once ``worker_id`` sent no heartbeat for the TTL (polled every
        ``lost_worker_grace_s``, so a lost worker is noticed within TTL + that grace)."""
        while self.workers.is_live(worker_id):  # noqa: ASYNC110 (ages out: no event)
            await trio.sleep(self.config.lost_worker_grace_s)
        return f"no heartbeat for over {self.workers.ttl_s:g}s"

    # ---- status -----------------------------------------------------------------------------

    async def _health(self, entry: HiveEntry, results: dict[str, dict[str, Any]]) -> None:
        info: dict[str, Any] = {**entry.to_dict(), "reachable": False}
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(2.0)) as client:
                response = await client.get(f"{entry.url}/health")
            info["reachable"] = response.status_code == 200
            if info["reachable"]:
                info["health"] = response.json()
            else:
                info["error"] = f"HTTP {response.status_code}"
        except (httpx.HTTPError, ValueError) as exc:
            info["error"] = str(exc) or type(exc).__name__
        results[entry.alias] = info

    async def hive_health(self) -> list[dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        async with trio.open_nursery() as nursery:
            for entry in self.config.hives.values():
                nursery.start_soon(self._health, entry, results)
        return [results[alias] for alias in self.config.hives if alias in results]

    async def status(self) -> None:
        hives = await self.hive_health()
        workers = self.workers.snapshot()
        counts = {state.value: n for state, n in self.registry.counts().items() if n}
        lines = [
            f"hive {h['alias']} {h['url']}: {'up' if h['reachable'] else 'DOWN'}" for h in hives
        ]
        lines += [
            f"worker {w['worker_id']} {w['state']} model={w['model']} hive={w['hive_id']} "
            f"url={w['url']}"
            for w in workers
        ]
        narrate(
            "status",
            f"{len(hives)} hive(s), {len(workers)} live worker(s), "
            f"{max(self.registry.running - 1, 0)} other running job(s)"
            + "".join(f"\n  {x}" for x in lines),
            hives=hives,
            workers=workers,
            jobs=counts,
        )

    async def hive_status(self, alias: str) -> None:
        entry = self.hive(alias)
        results: dict[str, dict[str, Any]] = {}
        await self._health(entry, results)
        info = results[alias]
        if not info["reachable"]:
            raise ForwardFailed(f"hive {alias!r} at {entry.url} is unreachable: {info['error']}")
        narrate("hive_status", f"hive {alias} at {entry.url} is up", hive=info)

    # ---- hive lifecycle and SSH ----------------------------------------------------------------

    async def _ssh(
        self, host: str, *command: str, stdin: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ssh host command`` (batch mode, bounded); never prompts, never hangs.
        ``stdin`` (a secret, say) is sent as one line on the command's standard input."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, *command]
        narrate("ssh", f"$ {' '.join(argv)}")
        try:
            with trio.fail_after(self.config.ssh_timeout_s):
                return await trio.run_process(
                    argv,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    stdin=subprocess.DEVNULL if stdin is None else (stdin + "\n").encode(),
                )
        except trio.TooSlowError:
            raise ForwardFailed(
                f"ssh {host} did not finish within {self.config.ssh_timeout_s:g}s"
            ) from None
        except FileNotFoundError:
            raise NotSupported("ssh: no ssh client installed on the queen's host") from None

    async def ssh_test(self, alias: str) -> None:
        entry = self.config.hives.get(alias)
        host = (entry.ssh_host if entry else None) or (
            urlsplit(entry.url).hostname if entry else alias
        )
        assert host is not None
        result = await self._ssh(host, "true")
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()[-300:]
            raise ForwardFailed(f"ssh {host} failed (exit {result.returncode}): {detail}")
        narrate("ssh_test", f"ssh {host}: ok", host=host)

    async def import_ssh(self, op: HiveImportSsh) -> None:
        path = trio.Path(op.ssh_config_path)
        try:
            path = await path.expanduser()
            text = await path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ForwardFailed(f"cannot read {path}: {exc.strerror}") from None
        added = []
        for alias, hostname in parse_ssh_config(text):
            if alias in self.config.hives:
                continue
            entry = HiveEntry(alias, f"http://{hostname}:{op.default_hive_port}", ssh_host=alias)
            self.config.hives[alias] = entry
            await self.keep_hive(entry, "ssh")
            added.append(entry.to_dict())
        narrate(
            "hive_import_ssh",
            f"Imported {len(added)} hive(s) from {path}"
            + "".join(f"\n  {h['alias']} {h['url']}" for h in added),
            hives=added,
        )

    async def hive_start(self, op: HiveStart | str) -> None:
        """Start the hive ``op.alias`` unless it answers: as a child of this queen when its
        URL is on this machine, else over SSH on its ``ssh_host``.

        A local hive gets the operator's settings: the config file and state directory
        the queen was started with (or those of ``op``), its models directory from ``op``,
        else from the config file, else ``<state dir>/models``; never a path relative to
        the queen's working directory. Both get the hive's token and this queen's URL.
        ``op`` may be just the alias.
        """
        if isinstance(op, str):
            op = HiveStart(alias=op)
        alias = op.alias
        entry = self.hive(alias)
        results: dict[str, dict[str, Any]] = {}
        await self._health(entry, results)
        if results[alias]["reachable"]:
            narrate("hive_start", f"hive {alias} at {entry.url} is already running")
            return
        host = urlsplit(entry.url).hostname or "127.0.0.1"
        token = entry.token or self.config.token
        if not is_loopback(host):
            await self._ssh_start(op, entry, token)
        else:
            config_file, state_dir, models_dir = self._local_paths(op)
            narrate(
                "hive_start_local",
                f"Starting hive {alias} here: config {config_file or '(none)'}, state dir "
                f"{state_dir or default_state_dir()}, models in {models_dir}",
                config=config_file,
                state_dir=state_dir,
                models_dir=models_dir,
            )
            argv = hive_argv(entry, host, self.url, config_file, state_dir, models_dir)
            process: trio.Process = await self._nursery.start(self._run_hive, alias, argv, token)
            self._started_hives[alias] = process
        with trio.fail_after(20):
            await wait_healthy(entry.url, interval_s=0.1)
        narrate("hive_start", f"hive {alias} is up at {entry.url}")

    def _local_paths(self, op: HiveStart) -> tuple[str | None, str | None, str]:
        """``(config file, state dir, models dir)`` of a hive started on this machine."""
        config_file = op.config or self.config.config_file
        state_dir = op.state_dir or self.config.state_dir
        models_dir = op.models_dir
        if models_dir is None and config_file is not None:
            try:
                models_dir = read_config(config_file, "hive").get("models_dir")
            except (OSError, ValueError) as exc:
                raise ForwardFailed(f"hive {op.alias}: config {config_file}: {exc}") from None
        if models_dir is None:
            models_dir = str((Path(state_dir) if state_dir else default_state_dir()) / "models")
        return config_file, state_dir, models_dir

    async def _ssh_start(self, op: HiveStart, entry: HiveEntry, token: str | None) -> None:
        if entry.ssh_host is None:
            raise NotSupported(f"hive_start of remote hive {entry.alias!r} without an ssh_host")
        if not token:
            raise ForwardFailed(
                f"hive_start of remote hive {entry.alias!r}: a hive reachable from other "
                f"machines needs a token; set token in [hives.{entry.alias}] or the queen's "
                "--token"
            )
        queen_url = self.url
        if queen_url is not None and is_loopback(urlsplit(queen_url).hostname or ""):
            narrate(
                "hive_start_warning",
                f"not passing the queen's URL {queen_url} to hive {entry.alias}: it is "
                "loopback (start the queen with --advertise-url so remote workers can "
                "heartbeat)",
            )
            queen_url = None
        argv = hive_argv(entry, "0.0.0.0", queen_url, op.config, op.state_dir, op.models_dir)
        result = await self._ssh(entry.ssh_host, remote_hive_command(argv), stdin=token)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()[-300:]
            raise ForwardFailed(f"starting hive {entry.alias} over ssh failed: {detail}")

    async def _run_hive(
        self,
        alias: str,
        argv: list[str],
        token: str | None,
        task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        env = dict(os.environ)
        if token:
            env["TRIO_JOBS_TOKEN"] = token  # not on the command line, where ps shows it
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "servers", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            assert process.stdout is not None
            with trio.fail_after(20):
                line = await read_first_line(process.stdout)
            if line is None:
                raise ForwardFailed(f"hive {alias} exited before listening")
            task_status.started(process)
            await drain(process.stdout)
            await process.wait()
        finally:
            await terminate(process, 5.0)
            self._started_hives.pop(alias, None)

    async def hive_stop(self, alias: str) -> None:
        self.hive(alias)
        process = self._started_hives.get(alias)
        if process is None:
            raise NotSupported(
                f"hive_stop of {alias!r}: this queen did not start it (stop it with SIGTERM "
                "where it runs)"
            )
        code = await terminate(process, 8.0)
        narrate("hive_stop", f"hive {alias} stopped (exit code {code})")

    async def stop_hives(self) -> None:
        async with trio.open_nursery() as nursery:
            for process in list(self._started_hives.values()):
                nursery.start_soon(terminate, process, 8.0)

    # ---- extra routes -------------------------------------------------------------------------

    def add_routes(self, app: Any) -> None:
        """``POST /v1/workers/heartbeat``, ``GET /v1/workers``, ``GET /v1/hives``."""
        from quart import jsonify, request

        async def heartbeat() -> Any:
            beat = _validated(Heartbeat, await request.get_json(force=True, silent=True))
            before = self.workers.status(beat.worker_id)
            data = beat.model_dump()
            self.workers.beat(data)
            if beat.state != before and not {beat.state, before} <= {"ready", "busy"}:
                logger.info(
                    "worker %s %s: model %s at %s",
                    beat.worker_id,
                    beat.state if before else f"joined ({beat.state})",
                    beat.model,
                    beat.url,
                )
            logger.debug("heartbeat from worker %s (%s)", beat.worker_id, beat.state)
            answer: dict[str, Any] = {"status": "ok", "ttl_s": self.workers.ttl_s}
            if self.book is not None:
                self.book.heard(data)
                if self.book.shared:
                    answer["queens"] = sorted(set(self.book.queens.values()))
            return jsonify(answer)

        async def register_hive() -> Any:
            hive = _validated(HiveRegistration, await request.get_json(force=True, silent=True))
            known = self.config.hives.get(hive.alias)
            entry = HiveEntry(
                hive.alias,
                hive.url.rstrip("/"),
                ssh_host=known.ssh_host if known else None,
                token=known.token if known else None,
            )
            self.config.hives[hive.alias] = entry
            await self.keep_hive(entry, "registered")
            logger.info("hive %s registered at %s", entry.alias, entry.url)
            return jsonify(entry.to_dict())

        async def workers() -> Any:
            return jsonify({"workers": self.workers.snapshot()})

        async def hives() -> Any:
            if self.book is not None:  # hives another queen registered a moment ago too
                with contextlib.suppress(Exception):  # the store is down: what we know
                    await self.book.read_hives()
            return jsonify({"hives": [h.to_dict() for h in self.config.hives.values()]})

        app.add_url_rule("/v1/workers/heartbeat", "worker_heartbeat", heartbeat, methods=["POST"])
        app.add_url_rule("/v1/workers", "workers", workers, methods=["GET"])
        app.add_url_rule("/v1/hives", "hives", hives, methods=["GET"])
        app.add_url_rule("/v1/hives", "register_hive", register_hive, methods=["POST"])


async def serve_queen(
    config: QueenConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 7833,
    registry: JobRegistry | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a queen until SIGTERM/SIGINT.

    With a store, the jobs it holds are recovered before the queen listens (jobs that were
    running when a previous queen died end ``FAILED("interrupted")`` or are re-queued)
    and every change is written back until it stops. With PostgreSQL the queen runs in
    shared mode: queued jobs are claimed through the database, so each runs once across
    the queens on that schema, and any queen answers for any job.
    """
    owned = registry is None
    shared_mode = owned and config.store.kind == "postgres"
    if registry is None:
        node = config.node or f"{socket.gethostname()}-{os.getpid()}"
        store = make_store(
            config.store, schema=config.pg_schema, node=node if shared_mode else None
        )
        registry = make_registry(store, config.retention_s)
    async with trio.open_nursery() as nursery:
        queen = Queen(config, registry, nursery)
        app = create_app(
            registry,
            None if shared_mode else queen.execute,
            name="queen",
            parse_payload=parse_queen_payload,
            token=config.token,
            max_concurrent=config.max_concurrent,
            payload_schema=operation_schema(),
            cors_origins=config.cors_origins,
            allowed_hosts=config.allowed_hosts,
        )
        queen.add_routes(app)
        add_ui_routes(app, hive_health=queen.hive_health)
        add_openai_routes(app, queen)

        def started(url: str) -> None:
            if queen.url is None:
                queen.url = url
            if queen.book is not None:
                queen.book.url = queen.url

        # Persistence (and in shared mode the runner) outlives the server: it is stopped
        # only once the server and its jobs have ended, so their final states are written.
        async with trio.open_nursery() as jobs:
            if shared_mode:
                await start_store(
                    jobs,
                    config.store,
                    run_shared_jobs,
                    registry,
                    queen.execute,
                    max_concurrent=config.max_concurrent,
                    lease=config.lease_s,
                )
            elif owned and registry.store is not None:
                await start_store(jobs, config.store, run_persistence, registry)
            if owned and registry.store is not None:
                logger.info("queen: %d job(s) recovered from %s", len(registry), config.store)
                queen.book = ClusterBook(
                    registry.store,
                    config.hives,
                    configured=set(config.hives),
                    workers=queen.workers,
                    node=node,
                    shared=shared_mode,
                    interval=min(1.0, config.heartbeat_ttl_s / 5),
                )
                try:
                    await queen.book.load()
                except Exception as exc:
                    logger.warning("queen: stored hives not read (%s)", exc)
                jobs.start_soon(queen.book.run)
            await run_daemon(
                app,
                host=host,
                port=port,
                name="queen",
                started=started,
                on_stop=queen.stop_hives,
                task_status=task_status,
            )
            jobs.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
